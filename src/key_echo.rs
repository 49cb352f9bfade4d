//! Finds the API key in bytes upstream sent back, however an encoder spelled it.
//!
//! An upstream that echoes the request's credentials rarely echoes them byte for byte: a JSON
//! encoder writes `/` as `\/` (PHP), `+`, `<`, `>` and `&` as `\u002B`, `\u003c`… (.NET, Go), must
//! write `"` and `\` as `\"` and `\\`, and may write any character as `\uXXXX` in either case; a URL
//! in the body percent-encodes (`%2F`, `%2f`), and a percent-encoded URL inside a JSON string may
//! have its `%` escaped too (`\u0025`). [`EchoFinder`] matches the key one character at a time,
//! each character in any of those spellings, mixed freely within one echo.
//!
//! An echo that starts right after an escaping backslash (`\` followed by the key's first
//! character, as in `\n…` for a key starting with `n`) takes that backslash along, so replacing
//! it never leaves half an escape behind. Not covered: encodings of encodings (`%252F`, JSON inside
//! a JSON string), HTML entities, base64; and a key that itself holds `"` or `\` can match JSON
//! syntax raw (a body that echoes all but its last `"` loses that quote to the scrub, and is then
//! passed through rather than stored).
//!
//! Hand-written, because no crate searches for a needle under per-character encodings. Nearly
//! every body holds neither `\` nor `%`, and then only the raw spelling is possible: that case is
//! memchr's SIMD substring search, as before. Otherwise every byte that can start a spelling of
//! the key's first character is tried, tracking the set of places the key could have reached so
//! far; that set stays small (a few per character of the key), so for a given key the work is
//! linear in the body whatever it holds.

use std::ops::Range;

use memchr::memmem::Finder;

/// Longest spelling of one character: `\u0025` followed by two hex digits.
const LONGEST_SPELLING: usize = 8;

/// Finds one key in every spelling listed in the module documentation.
#[derive(Clone)]
pub struct EchoFinder {
    key: Box<[u8]>,
    raw: Finder<'static>,
}

impl EchoFinder {
    /// A finder for `key`, which must not be empty.
    pub fn new(key: &[u8]) -> Self {
        assert!(!key.is_empty(), "an empty key matches everywhere");
        Self {
            key: key.into(),
            raw: Finder::new(key).into_owned(),
        }
    }

    /// The first echo of the key in `haystack`, as the byte range it spans there.
    pub fn find(&self, haystack: &[u8]) -> Option<Range<usize>> {
        self.echoes(haystack).next()
    }

    /// Every echo of the key in `haystack`, left to right, not overlapping: one pass over the body.
    pub fn echoes<'a>(&'a self, haystack: &'a [u8]) -> Echoes<'a> {
        Echoes {
            finder: self,
            haystack,
            position: 0,
            escapes: memchr::memchr2(b'\\', b'%', haystack).is_some(),
            reached: Vec::new(),
            next: Vec::new(),
        }
    }

    /// A quick look at two bytes: a raw first character must be followed by the second one, raw
    /// or starting an escape (most candidates are the first character inside ordinary text).
    fn may_start_at(&self, haystack: &[u8], start: usize) -> bool {
        if haystack[start] != self.key[0] || haystack[start] == b'\\' || haystack[start] == b'%' {
            return true;
        }
        match (self.key.get(1), haystack.get(start + 1)) {
            (None, _) => true,
            (Some(second), Some(next)) => next == second || *next == b'\\' || *next == b'%',
            (Some(_), None) => false,
        }
    }

    /// Where the key ends if some spelling of it starts at `start`. `reached` and `next` are
    /// scratch space, kept across calls so candidates cost no allocation.
    fn spelled_from(
        &self,
        haystack: &[u8],
        start: usize,
        reached: &mut Vec<usize>,
        next: &mut Vec<usize>,
    ) -> Option<usize> {
        reached.clear();
        reached.push(start);
        for &wanted in self.key.iter() {
            next.clear();
            for &at in reached.iter() {
                for length in spellings(haystack.get(at..).unwrap_or_default(), wanted) {
                    if !next.contains(&(at + length)) {
                        next.push(at + length);
                    }
                }
            }
            if next.is_empty() {
                return None;
            }
            std::mem::swap(reached, next);
        }
        // The longest spelling, so no part of an encoded echo is left behind.
        reached.iter().copied().max()
    }
}

/// The echoes of one key in one body; see [`EchoFinder::echoes`].
pub struct Echoes<'a> {
    finder: &'a EchoFinder,
    haystack: &'a [u8],
    /// Where the search goes on from.
    position: usize,
    /// Whether the body holds `\` or `%` at all; without either, only the raw spelling exists.
    escapes: bool,
    /// Scratch space for [`EchoFinder::spelled_from`], kept across candidates.
    reached: Vec<usize>,
    next: Vec<usize>,
}

impl Iterator for Echoes<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let rest = self.haystack.get(self.position..)?;
        let finder = self.finder;
        if !self.escapes {
            let start = self.position + finder.raw.find(rest)?;
            self.position = start + finder.key.len();
            return Some(start..self.position);
        }
        let candidates = memchr::memchr3_iter(finder.key[0], b'\\', b'%', rest).map(|at| self.position + at);
        for start in candidates {
            if !finder.may_start_at(self.haystack, start) {
                continue;
            }
            if let Some(end) = finder.spelled_from(self.haystack, start, &mut self.reached, &mut self.next) {
                let start = self.over_escaping_backslash(start);
                self.position = end;
                return Some(start..end);
            }
        }
        self.position = self.haystack.len();
        None
    }
}

impl Echoes<'_> {
    /// `start`, or one byte earlier when an escaping backslash stands right before it (an odd
    /// run of them): the echo is then the tail of an escape, which goes with it.
    fn over_escaping_backslash(&self, start: usize) -> usize {
        let before = &self.haystack[self.position..start];
        let backslashes = before.iter().rev().take_while(|byte| **byte == b'\\').count();
        if backslashes % 2 == 1 { start - 1 } else { start }
    }
}

/// The lengths of the spellings of `wanted` that `text` starts with (up to four at once).
fn spellings(text: &[u8], wanted: u8) -> impl Iterator<Item = usize> {
    let raw = text.first() == Some(&wanted);
    let short_escape =
        text.first() == Some(&b'\\') && matches!(wanted, b'"' | b'\\' | b'/') && text.get(1) == Some(&wanted);
    let escaped = unicode_escape(text);
    let percent = text.first() == Some(&b'%') && hex_byte(text.get(1..3)) == Some(wanted);
    let escaped_percent = escaped == Some(b'%') && hex_byte(text.get(6..8)) == Some(wanted);
    [
        (raw, 1),
        (short_escape, 2),
        (percent, 3),
        (escaped == Some(wanted), 6),
        (escaped_percent, LONGEST_SPELLING),
    ]
    .into_iter()
    .filter_map(|(matches, length)| matches.then_some(length))
}

/// The ASCII character a leading `\u00XX` stands for, if `text` starts with one.
fn unicode_escape(text: &[u8]) -> Option<u8> {
    if text.get(..4)? != b"\\u00" {
        return None;
    }
    hex_byte(text.get(4..6))
}

/// Two hex digits, either case, as a byte.
fn hex_byte(digits: Option<&[u8]>) -> Option<u8> {
    let digits = digits?;
    let value = |digit: u8| char::from(digit).to_digit(16);
    let (high, low) = (value(*digits.first()?)?, value(*digits.get(1)?)?);
    u8::try_from(high * 16 + low).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn found<'a>(key: &str, haystack: &'a str) -> Option<&'a str> {
        EchoFinder::new(key.as_bytes())
            .find(haystack.as_bytes())
            .map(|range| &haystack[range])
    }

    #[test]
    fn raw_json_and_percent_spellings_are_found_with_their_exact_span() {
        let key = "pk/a+b\"c\\d<e>&";
        for spelled in [
            r#"pk/a+b"c\d<e>&"#,
            r#"pk\/a+b\"c\\d<e>&"#,
            r#"pk\u002fa\u002Bb\u0022c\u005Cd\u003ce\u003E\u0026"#,
            "pk%2Fa%2bb%22c%5Cd%3Ce%3e%26",
            r#"pk\u00252Fa+b\"c\\d<e>&"#,
            r#"\u0070\u006B/a%2Bb\"c\\d\u003ce>&"#,
        ] {
            let haystack = format!("{{\"echo\":\"{spelled}\",\"after\":1}}");
            assert_eq!(found(key, &haystack), Some(spelled), "{spelled}");
        }
    }

    #[test]
    fn every_echo_is_found_in_one_pass_and_an_escape_tail_takes_its_backslash() {
        let finder = EchoFinder::new(b"nabc");
        let body = br#"{"a":"nabc","b":"x\nabc","c":"n%61bc nabc"}"#;
        let echoes: Vec<&[u8]> = finder.echoes(body).map(|range| &body[range]).collect();
        assert_eq!(echoes, [&b"nabc"[..], br"\nabc", b"n%61bc", b"nabc"]);
        // Without escapes in the body, the substring search finds them all too.
        let plain = b"nabc nabc xnabcx";
        assert_eq!(finder.echoes(plain).count(), 3);
        // An escaped backslash before the key is not an escape of its first character.
        let body = br#"{"path":"C:\\nabc"}"#;
        let echo = finder.find(body).expect("found");
        assert_eq!(&body[echo], b"nabc");
    }

    #[test]
    fn near_misses_are_not_echoes() {
        let key = "pk_live_123";
        for haystack in [
            "pk_live_12",
            "pk_live_124",
            r"pk\_live_123",
            "pk%5Flive%5F12",
            r"pk\u005flive_12x",
            "pk%G5live_123",
            r"pk\u00zzlive_123",
        ] {
            assert_eq!(found(key, haystack), None, "{haystack}");
        }
        assert_eq!(found(key, "xx pk_live_123 yy"), Some("pk_live_123"));
    }

    #[test]
    fn a_key_made_of_escape_characters_is_found_after_many_near_misses() {
        // Every byte of the haystack starts a plausible spelling of this key; none completes.
        // (`benches/hot_path.rs` measures the time this takes: linear in the body.)
        let key = "\\\\\\\\%%%%".repeat(8);
        let haystack = "\\\\%25".repeat(20_000);
        assert_eq!(found(&key, &haystack), None);
        let echo = key.replace('\\', "\\\\").replace('%', "%25");
        let echoed = format!("{haystack}{echo}");
        assert_eq!(found(&key, &echoed), Some(echo.as_str()));
    }

    /// One way to write a visible ASCII character.
    #[derive(Debug, Clone, Copy)]
    enum Spelling {
        Raw,
        JsonShort,
        JsonUnicodeLower,
        JsonUnicodeUpper,
        Percent,
        EscapedPercent,
    }

    fn spell(key: &str, spellings: &[Spelling]) -> String {
        key.bytes()
            .zip(spellings.iter().cycle())
            .map(|(byte, spelling)| match spelling {
                Spelling::Raw => char::from(byte).to_string(),
                Spelling::JsonShort if matches!(byte, b'"' | b'\\' | b'/') => {
                    format!("\\{}", char::from(byte))
                }
                Spelling::JsonShort => char::from(byte).to_string(),
                Spelling::JsonUnicodeLower => format!("\\u{byte:04x}"),
                Spelling::JsonUnicodeUpper => format!("\\u{byte:04X}"),
                Spelling::Percent => format!("%{byte:02X}"),
                Spelling::EscapedPercent => format!("\\u0025{byte:02x}"),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn any_mix_of_spellings_is_found_and_nothing_else_is(
            key in "[!-~]{1,40}",
            spellings in proptest::collection::vec(
                prop_oneof![
                    Just(Spelling::Raw),
                    Just(Spelling::JsonShort),
                    Just(Spelling::JsonUnicodeLower),
                    Just(Spelling::JsonUnicodeUpper),
                    Just(Spelling::Percent),
                    Just(Spelling::EscapedPercent),
                ],
                1..8,
            ),
            before in "[ -~]{0,30}",
            after in "[ -~]{0,30}",
        ) {
            let spelled = spell(&key, &spellings);
            let haystack = format!("{before}{spelled}{after}");
            let finder = EchoFinder::new(key.as_bytes());
            let range = finder.find(haystack.as_bytes());
            prop_assert!(range.is_some(), "{spelled:?} not found in {haystack:?}");
            // Found no later than where it was put (an earlier echo may come from `before`).
            let range = range.unwrap_or_default();
            prop_assert!(range.start <= before.len(), "{range:?} in {haystack:?}");
        }

        #[test]
        fn a_key_with_one_character_changed_is_found_in_no_spelling(
            key in "[!-$&-\\[\\]-~]{2,40}",
            at in any::<proptest::sample::Index>(),
            replacement in "[!-$&-\\[\\]-~]",
            spellings in proptest::collection::vec(
                prop_oneof![
                    Just(Spelling::Raw),
                    Just(Spelling::JsonShort),
                    Just(Spelling::JsonUnicodeLower),
                    Just(Spelling::JsonUnicodeUpper),
                    Just(Spelling::Percent),
                    Just(Spelling::EscapedPercent),
                ],
                1..8,
            ),
        ) {
            // Keys and replacements without `%` and `\`, so a haystack has one reading only.
            let at = at.index(key.len());
            let mut changed = key.clone().into_bytes();
            let replacement = replacement.as_bytes()[0];
            prop_assume!(changed[at] != replacement);
            changed[at] = replacement;
            let changed = String::from_utf8(changed).expect("ASCII");
            let haystack = spell(&changed, &spellings);
            prop_assert_eq!(EchoFinder::new(key.as_bytes()).find(haystack.as_bytes()), None, "{}", haystack);
        }
    }
}
