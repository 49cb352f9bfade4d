//! deploy/Dockerfile, carried out without a container engine: its instructions parsed, its build
//! stage's COPY and RUN lines done in order in a directory standing for the WORKDIR (same files,
//! filtered by .dockerignore as the build context is; same commands), and its runtime stage's
//! COPY lines laid out in a directory standing for the image's root. What a `docker build` would
//! fail on (a file not in the context, a source the build needs but not copied, a bench target not
//! stubbed) fails here too; what differs from an engine is said where it differs.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// One instruction, continuation lines joined, comments dropped.
#[derive(Debug, Clone)]
pub struct Instruction {
    pub keyword: String,
    pub arguments: String,
}

/// A stage: its `FROM` line (image and name) and the instructions after it.
#[derive(Debug)]
pub struct Stage {
    pub image: String,
    pub name: Option<String>,
    pub instructions: Vec<Instruction>,
}

/// Parses a Dockerfile into stages. Panics on anything it does not understand, so a new kind of
/// instruction makes the test grow with the file rather than be skipped.
pub fn parse(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        // Comment lines are removed before continuations are joined, as the engine does
        // (parser directives like `# syntax=` included).
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(
        current.trim().is_empty(),
        "the Dockerfile ends inside a continuation"
    );

    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let line = line.trim();
        let (keyword, arguments) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let instruction = Instruction {
            keyword: keyword.to_ascii_uppercase(),
            arguments: arguments.trim().to_owned(),
        };
        if instruction.keyword == "FROM" {
            let words: Vec<&str> = instruction.arguments.split_whitespace().collect();
            let name = match words.as_slice() {
                [_] => None,
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => panic!("FROM {}: expected `image [AS name]`", instruction.arguments),
            };
            stages.push(Stage {
                image: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{keyword} before any FROM"))
                .instructions
                .push(instruction);
        }
    }
    stages
}

/// The arguments of an exec-form instruction (`["a", "b"]`), e.g. ENTRYPOINT or CMD.
pub fn exec_form(arguments: &str) -> Vec<String> {
    serde_json::from_str(arguments)
        .unwrap_or_else(|error| panic!("{arguments}: not the exec (JSON array) form: {error}"))
}

/// `.dockerignore`: which files of the context an engine sends. Patterns as Docker reads them:
/// `*` and `?` within a path segment, `**` for any number of segments, `!` to include again,
/// the last matching pattern deciding, and a pattern naming a directory covering all under it.
pub struct DockerIgnore {
    patterns: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Self {
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (exclude, pattern) = match line.strip_prefix('!') {
                    Some(pattern) => (false, pattern),
                    None => (true, line),
                };
                let segments = pattern
                    .trim_matches('/')
                    .split('/')
                    .filter(|segment| !segment.is_empty() && *segment != ".")
                    .map(str::to_owned)
                    .collect();
                (exclude, segments)
            })
            .collect();
        DockerIgnore { patterns }
    }

    /// Whether the context holds this file (a path relative to the context root).
    pub fn includes(&self, relative: &Path) -> bool {
        let segments: Vec<String> = relative
            .components()
            .map(|component| component.as_os_str().to_string_lossy().into_owned())
            .collect();
        let mut included = true;
        for (exclude, pattern) in &self.patterns {
            // The pattern matches the file or one of the directories holding it.
            if (1..=segments.len()).any(|length| matches(pattern, &segments[..length])) {
                included = !exclude;
            }
        }
        included
    }
}

fn matches(pattern: &[String], path: &[String]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(first), _) if first == "**" => {
            (0..=path.len()).any(|skip| matches(&pattern[1..], &path[skip..]))
        }
        (Some(first), Some(segment)) => {
            segment_matches(first.as_bytes(), segment.as_bytes()) && matches(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

fn segment_matches(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => (0..=text.len()).any(|skip| segment_matches(&pattern[1..], &text[skip..])),
        (Some(b'?'), Some(_)) => segment_matches(&pattern[1..], &text[1..]),
        (Some(expected), Some(actual)) => expected == actual && segment_matches(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// The build context: the repository root, seen through `.dockerignore`.
pub struct Context {
    pub root: PathBuf,
    pub ignore: DockerIgnore,
}

impl Context {
    /// Every context file a COPY source names: the file itself, or the files under a directory.
    /// Panics when the source is not in the context, as `docker build` fails on it.
    fn files(&self, source: &str) -> Vec<PathBuf> {
        assert!(
            !source.contains(['*', '?', '[']),
            "COPY {source}: wildcards are not supported here; name the files"
        );
        let relative = normalise(Path::new(source));
        let full = self.root.join(&relative);
        let mut files = Vec::new();
        if full.is_dir() {
            walk(&self.root, &relative, &mut files);
        } else if full.is_file() {
            files.push(relative.clone());
        }
        files.retain(|file| self.ignore.includes(file));
        assert!(
            !files.is_empty(),
            "COPY {source}: not in the build context (missing, or excluded by .dockerignore)"
        );
        files
    }
}

fn walk(root: &Path, relative: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(root.join(relative))
        .unwrap_or_else(|error| panic!("{}: {error}", relative.display()))
        .map(|entry| relative.join(entry.expect("a directory entry").file_name()))
        .collect();
    entries.sort();
    for entry in entries {
        if root.join(&entry).is_dir() {
            walk(root, &entry, files);
        } else {
            files.push(entry);
        }
    }
}

fn normalise(path: &Path) -> PathBuf {
    path.components()
        .filter(|component| !matches!(component, Component::CurDir | Component::RootDir))
        .collect()
}

/// Copies `sources` (context paths) to `destination` (inside `into`), with COPY's rules: several
/// sources or a destination ending in `/` make it a directory; a directory source copies its
/// contents; a single file source names the destination file itself.
fn copy(context: &Context, sources: &[&str], destination: &Path, destination_is_dir: bool, into: &Path) {
    let target = into.join(normalise(destination));
    for source in sources {
        let source_path = normalise(Path::new(source));
        let source_is_dir = context.root.join(&source_path).is_dir();
        for file in context.files(source) {
            let to = if source_is_dir {
                target.join(file.strip_prefix(&source_path).expect("under the source"))
            } else if destination_is_dir {
                target.join(file.file_name().expect("a file name"))
            } else {
                target.clone()
            };
            std::fs::create_dir_all(to.parent().expect("a parent")).expect("create directory");
            std::fs::copy(context.root.join(&file), &to)
                .unwrap_or_else(|error| panic!("copy {} to {}: {error}", file.display(), to.display()));
        }
    }
}

/// The result of the build stage: where its WORKDIR and its cargo target directory are here.
pub struct Built {
    pub stage_name: String,
    pub workdir: String,
    pub workdir_here: PathBuf,
    pub target_here: PathBuf,
}

impl Built {
    /// Where a path of the build stage's filesystem is here. `<WORKDIR>/target` is the persistent
    /// cargo target directory (CARGO_TARGET_DIR), not a directory under the WORKDIR: the one
    /// difference from an engine, so local re-runs compile only what changed.
    pub fn path(&self, in_stage: &str) -> PathBuf {
        let relative = Path::new(in_stage)
            .strip_prefix(&self.workdir)
            .unwrap_or_else(|_| panic!("{in_stage} is outside the build stage's WORKDIR {}", self.workdir));
        match relative.strip_prefix("target") {
            Ok(rest) => self.target_here.join(rest),
            Err(_) => self.workdir_here.join(relative),
        }
    }
}

/// Carries out the build stage: WORKDIR, then COPY and RUN in order. `RUN` lines run with
/// `/bin/sh -c` (the shell form, as the engine runs them) in the WORKDIR, with `env` added.
pub fn build(
    stage: &Stage,
    context: &Context,
    workdir_here: &Path,
    target_here: &Path,
    env: &[(&str, &str)],
) -> Built {
    let name = stage.name.clone().expect("the build stage is named");
    let mut workdir = None;
    if workdir_here.exists() {
        std::fs::remove_dir_all(workdir_here).expect("clear the previous WORKDIR");
    }
    std::fs::create_dir_all(workdir_here).expect("create the WORKDIR");
    for instruction in &stage.instructions {
        let arguments = instruction.arguments.as_str();
        match instruction.keyword.as_str() {
            "WORKDIR" => {
                assert!(workdir.is_none(), "one WORKDIR in the build stage");
                assert!(arguments.starts_with('/'), "WORKDIR {arguments}: absolute");
                workdir = Some(arguments.trim_end_matches('/').to_owned());
            }
            "COPY" => {
                assert!(workdir.is_some(), "COPY before WORKDIR");
                let words: Vec<&str> = arguments.split_whitespace().collect();
                assert!(
                    !words.iter().any(|word| word.starts_with("--")),
                    "COPY {arguments}: flags are not supported in the build stage"
                );
                let (destination, sources) = words.split_last().expect("COPY needs a destination");
                assert!(!sources.is_empty(), "COPY {arguments}: no source");
                assert!(
                    !destination.starts_with('/'),
                    "COPY {arguments}: relative to the WORKDIR"
                );
                let destination_is_dir = sources.len() > 1 || destination.ends_with('/');
                copy(
                    context,
                    sources,
                    Path::new(destination),
                    destination_is_dir,
                    workdir_here,
                );
            }
            "RUN" => {
                assert!(workdir.is_some(), "RUN before WORKDIR");
                assert!(
                    !arguments.starts_with('['),
                    "RUN {arguments}: the shell form is expected"
                );
                let started = std::time::Instant::now();
                let output = Command::new("/bin/sh")
                    .arg("-c")
                    .arg(arguments)
                    .current_dir(workdir_here)
                    .env("CARGO_TARGET_DIR", target_here)
                    .envs(env.iter().copied())
                    .output()
                    .expect("run /bin/sh");
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    output.status.success(),
                    "RUN {arguments}\nfailed ({}):\n{}",
                    output.status,
                    tail(&stderr, 60)
                );
                eprintln!("RUN took {:.0?}: {arguments}", started.elapsed());
            }
            other => panic!("{other} in the build stage: not carried out by this test; teach it"),
        }
    }
    Built {
        stage_name: name,
        workdir: workdir.expect("a WORKDIR"),
        workdir_here: workdir_here.to_owned(),
        target_here: target_here.to_owned(),
    }
}

/// Lays out the runtime stage's files under `root_here`: `COPY --from=<build stage>` from the
/// build's results, plain COPY from the context. Returns the other instructions, for the caller
/// to check against the files.
pub fn runtime(stage: &Stage, built: &Built, context: &Context, root_here: &Path) -> Vec<Instruction> {
    let mut rest = Vec::new();
    for instruction in &stage.instructions {
        if instruction.keyword != "COPY" {
            rest.push(instruction.clone());
            continue;
        }
        let words: Vec<&str> = instruction.arguments.split_whitespace().collect();
        let (destination, sources) = words.split_last().expect("COPY needs a destination");
        assert!(
            destination.starts_with('/'),
            "COPY {}: absolute destination",
            instruction.arguments
        );
        match sources {
            [from, source] if from.starts_with("--from=") => {
                assert_eq!(
                    from.trim_start_matches("--from="),
                    built.stage_name,
                    "COPY --from names the build stage"
                );
                let built_file = built.path(source);
                assert!(
                    built_file.is_file(),
                    "COPY {}: the build stage made no {source} ({})",
                    instruction.arguments,
                    built_file.display()
                );
                let to = root_here.join(normalise(Path::new(destination)));
                std::fs::create_dir_all(to.parent().expect("a parent")).expect("create directory");
                std::fs::copy(&built_file, &to).expect("copy the built file");
            }
            [source] => copy(
                context,
                &[source],
                Path::new(destination),
                destination.ends_with('/'),
                root_here,
            ),
            _ => panic!("COPY {}: not supported here", instruction.arguments),
        }
    }
    rest
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
