//! A strict reader of the Prometheus text exposition, for exact assertions on a scrape.

use std::collections::{BTreeMap, HashMap};

/// One sample line.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape. Parsing panics on any line that is not valid exposition syntax.
#[derive(Debug)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name → declared type.
    pub types: HashMap<String, String>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        for line in text.lines().filter(|line| !line.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
                assert!(
                    matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped"),
                    "{line}"
                );
                types.insert(name.to_owned(), kind.to_owned());
            } else if line.starts_with("# HELP ") {
                continue;
            } else {
                assert!(!line.starts_with('#'), "unexpected comment {line:?}");
                samples.push(parse_sample(line));
            }
        }
        let scrape = Self {
            samples,
            types,
            text: text.to_owned(),
        };
        scrape.check_structure();
        scrape
    }

    /// The value of the sample with exactly this name and label set.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == wanted)
            .map(|sample| sample.value)
    }

    /// Like `value`, but a missing sample is a test failure.
    pub fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// The sum of the samples of `name` whose labels include `labels` (a test failure when there
    /// is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<f64> = self
            .series(name)
            .iter()
            .filter(|sample| {
                labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|sample| sample.value)
            .collect();
        assert!(
            !matching.is_empty(),
            "no sample {name}{labels:?} in:\n{}",
            self.text
        );
        matching.iter().sum()
    }

    /// Every sample of a metric name.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|sample| sample.name == name).collect()
    }

    /// The values one label takes across a metric's samples.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .series(name)
            .iter()
            .filter_map(|sample| sample.labels.get(label).cloned())
            .collect();
        values.sort();
        values.dedup();
        values
    }

    /// Every sample belongs to a declared family; histogram buckets are cumulative and end in +Inf = count.
    fn check_structure(&self) {
        for sample in &self.samples {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    sample
                        .name
                        .strip_suffix(suffix)
                        .filter(|base| self.types.get(*base).is_some_and(|kind| kind == "histogram"))
                })
                .unwrap_or(&sample.name);
            assert!(
                self.types.contains_key(family),
                "{} has no TYPE line",
                sample.name
            );
        }
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let mut by_series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for bucket in self.series(&format!("{family}_bucket")) {
                let mut labels = bucket.labels.clone();
                let bound = labels.remove("le").expect("bucket has le");
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().expect("le is a number")
                };
                by_series.entry(labels).or_default().push((bound, bucket.value));
            }
            for (labels, mut buckets) in by_series {
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                assert!(
                    buckets.windows(2).all(|pair| pair[0].1 <= pair[1].1),
                    "{family} not cumulative"
                );
                let (last_bound, last_value) = *buckets.last().expect("buckets");
                assert!(last_bound.is_infinite(), "{family} has no +Inf bucket");
                let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                assert_eq!(
                    Some(last_value),
                    self.value(&format!("{family}_count"), &pairs),
                    "{family}{labels:?}"
                );
            }
        }
    }
}

fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("bad sample line {line:?}"));
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest
                .strip_suffix('}')
                .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
            (name, parse_labels(body, line))
        }
    };
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name in {line:?}"
    );
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        assert_eq!(chars.next(), Some('"'), "label value not quoted in {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(escaped @ ('\\' | '"')) => value.push(escaped),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        assert!(labels.insert(key, value).is_none(), "repeated label in {line:?}");
        match chars.next() {
            Some(',') | None => {}
            other => panic!("unexpected {other:?} in {line:?}"),
        }
    }
    labels
}
