//! Finds the API key in bytes upstream sent back, however an encoder spelled it.
//!
//! An upstream that echoes the request's credentials rarely echoes them byte for byte: a JSON
//! encoder writes `/` as `\/` (PHP), `+`, `<`, `>` and `&` as `\u002B`, `\u003c`… (.NET, Go), must
//! write `"` and `\` as `\"` and `\\`, and may write any character as `\uXXXX` in either case;
//! JavaScript and Python also write `\'`, `\xHH` and `\u{XX}`, and a form decoder turns `+` into a
//! space; a URL in the body percent-encodes (`%2F`, `%2f`),
//! sometimes twice (`%252F`), and a percent-encoded URL inside a JSON string may have its `%`
//! escaped too (`\u0025`); an HTML error page (a proxy's, a CDN's) writes character references
//! (`&#47;`, `&#x2F;`, `&quot;`, `&amp;`, `&lt;`, `&gt;`, `&apos;`). [`EchoFinder`] matches the key
//! one character at a time, each character in any of those spellings, mixed freely within one echo.
//!
//! An echo that starts right after an escaping backslash (`\` followed by the key's first
//! character, as in `\n…` for a key starting with `n`) takes that backslash along, so replacing
//! it never leaves half an escape behind. Not covered: transformations of the whole key (base64,
//! hex, case changes), a part of the key, and compression (the gateway asks for none and refuses a
//! compressed answer, see `proxy`). A key that itself holds `"` or `\` can match JSON syntax raw (a
//! body that echoes all but its last `"` loses that quote to the scrub, and is then passed through
//! rather than stored).
//!
//! Hand-written, because no crate searches for a needle under per-character encodings. Nearly
//! every body holds none of `\`, `%` and `&`, and then only the raw spelling is possible: that case
//! is memchr's SIMD substring search, as before. Otherwise every byte that can start a spelling of
//! the key's first character is tried, tracking the set of places the key could have reached so
//! far; that set stays small (a few per character of the key), so for a given key the work is
//! linear in the body whatever it holds.

use std::ops::Range;

use memchr::memmem::Finder;

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
            escapes: memchr::memchr3(b'\\', b'%', b'&', haystack).is_some()
                || (self.key.contains(&b'+') && memchr::memchr(b' ', haystack).is_some()),
            reached: Vec::new(),
            next: Vec::new(),
        }
    }

    /// A quick look at two bytes: a raw first character must be followed by the second one, raw
    /// or starting an escape (most candidates are the first character inside ordinary text).
    fn may_start_at(&self, haystack: &[u8], start: usize) -> bool {
        if haystack[start] != self.key[0] || matches!(haystack[start], b'\\' | b'%' | b'&') {
            return true;
        }
        match (self.key.get(1), haystack.get(start + 1)) {
            (None, _) => true,
            (Some(second), Some(next)) => next == second || matches!(next, b'\\' | b'%' | b'&'),
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
    /// Whether the body holds `\`, `%` or `&` at all (or a space, for a key with `+`); without
    /// them, only the raw spelling exists.
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
        let candidates = candidates(finder.key[0], rest).map(|at| self.position + at);
        for start in candidates {
            if !finder.may_start_at(self.haystack, start) {
                continue;
            }
            // Bytes that are the tail of an escape mean something else there, so a spelled echo
            // cannot start among them; but the key in full, raw, is read by anyone who reads the
            // bytes (`%ab12…` for a key `ab12…`), whatever they stand for.
            let raw_start = !matches!(self.haystack[start], b'\\' | b'%' | b'&');
            let spelled = if raw_start && inside_escape(self.haystack, start) {
                self.haystack[start..]
                    .starts_with(&finder.key)
                    .then(|| start + finder.key.len())
            } else {
                finder.spelled_from(self.haystack, start, &mut self.reached, &mut self.next)
            };
            if let Some(end) = spelled {
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

/// Where in `text` a spelling of a key starting with `first` may start, in order: the raw first
/// character, or a byte that starts an escape (`\`, `%`, `&`).
fn candidates(first: u8, text: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut escapes_or_first = memchr::memchr3_iter(first, b'\\', b'%', text).peekable();
    let mut ampersands = memchr::memchr_iter(b'&', text).peekable();
    std::iter::from_fn(move || match (escapes_or_first.peek(), ampersands.peek()) {
        (Some(&a), Some(&b)) if a == b => {
            ampersands.next();
            escapes_or_first.next()
        }
        (Some(&a), Some(&b)) if b < a => ampersands.next(),
        (Some(_), _) => escapes_or_first.next(),
        (None, _) => ampersands.next(),
    })
}

/// The lengths of the spellings of `wanted` that `text` starts with (usually none or one, at most
/// a few).
fn spellings(text: &[u8], wanted: u8) -> impl Iterator<Item = usize> {
    let first = text.first().copied();
    // A form decoder turns `+` into a space.
    let raw = first == Some(wanted) || (wanted == b'+' && first == Some(b' '));
    // JSON and JavaScript: `\"`, `\\`, `\/`, and JavaScript's `\'`.
    let short_escape =
        first == Some(b'\\') && matches!(wanted, b'"' | b'\\' | b'/' | b'\'') && text.get(1) == Some(&wanted);
    let escaped = unicode_escape(text);
    // JavaScript and Python: `\xHH`.
    let hex_escape = text.get(..2) == Some(b"\\x") && hex_byte(text.get(2..4)) == Some(wanted);
    let percent = first == Some(b'%') && hex_byte(text.get(1..3)) == Some(wanted);
    // Percent-encoded twice (`%252F`), or once with its `%` JSON-escaped (`\u00252F`).
    let double_percent = text.get(..3) == Some(b"%25") && hex_byte(text.get(3..5)) == Some(wanted);
    let escaped_percent = escaped == Some(b'%') && hex_byte(text.get(6..8)) == Some(wanted);
    let entity = html_entity(text).filter(|(character, _)| *character == wanted);
    let braced = braced_escape(text).filter(|(character, _)| *character == wanted);
    [
        (raw, 1),
        (short_escape, 2),
        (percent, 3),
        (hex_escape, 4),
        (double_percent, 5),
        (escaped == Some(wanted), 6),
        (escaped_percent, 8),
    ]
    .into_iter()
    .filter_map(|(matches, length)| matches.then_some(length))
    .chain(entity.map(|(_, length)| length))
    .chain(braced.map(|(_, length)| length))
}

/// The ASCII character a leading JavaScript or Rust `\u{XX}` (1 to 6 hex digits) stands for, and
/// its length.
fn braced_escape(text: &[u8]) -> Option<(u8, usize)> {
    let digits = text.strip_prefix(b"\\u{")?;
    let count = digits
        .iter()
        .take(7)
        .take_while(|byte| byte.is_ascii_hexdigit())
        .count();
    if count == 0 || count > 6 || digits.get(count) != Some(&b'}') {
        return None;
    }
    let value = u32::from_str_radix(std::str::from_utf8(&digits[..count]).ok()?, 16).ok()?;
    Some((u8::try_from(value).ok()?, 3 + count + 1))
}

/// Whether the byte at `at` is part of an escape that starts before it (a hex digit of
/// `\u0031`, say): a raw echo cannot start there, the text there means something else.
fn inside_escape(haystack: &[u8], at: usize) -> bool {
    (at.saturating_sub(MAX_ESCAPE - 1)..at).any(|start| {
        matches!(haystack[start], b'\\' | b'%' | b'&')
            && escape_length(&haystack[start..]).is_some_and(|length| start + length > at)
    })
}

/// The longest escape [`escape_length`] recognises: `&#x0000041;`.
const MAX_ESCAPE: usize = 11;

/// The length of the escape (of any character) `text` starts with, if it starts with one.
fn escape_length(text: &[u8]) -> Option<usize> {
    let short = text.first() == Some(&b'\\') && matches!(text.get(1), Some(b'"' | b'\\' | b'/' | b'\''));
    let hex_escape = text.get(..2) == Some(b"\\x") && hex_byte(text.get(2..4)).is_some();
    let percent = text.first() == Some(&b'%') && hex_byte(text.get(1..3)).is_some();
    let double_percent = text.get(..3) == Some(b"%25") && hex_byte(text.get(3..5)).is_some();
    let escaped = unicode_escape(text);
    let escaped_percent = escaped == Some(b'%') && hex_byte(text.get(6..8)).is_some();
    [
        (escaped_percent, 8),
        (escaped.is_some(), 6),
        (double_percent, 5),
        (hex_escape, 4),
        (percent, 3),
        (short, 2),
    ]
    .into_iter()
    .find_map(|(matches, length)| matches.then_some(length))
    .or_else(|| html_entity(text).map(|(_, length)| length))
    .or_else(|| braced_escape(text).map(|(_, length)| length))
}

/// The ASCII character a leading `\u00XX` stands for, if `text` starts with one.
fn unicode_escape(text: &[u8]) -> Option<u8> {
    if text.get(..4)? != b"\\u00" {
        return None;
    }
    hex_byte(text.get(4..6))
}

/// The ASCII character a leading HTML character reference stands for, and its length: `&#47;`,
/// `&#x2F;` (up to 7 digits, either case), or one of `&quot;`, `&amp;`, `&lt;`, `&gt;`, `&apos;`.
fn html_entity(text: &[u8]) -> Option<(u8, usize)> {
    if text.first() != Some(&b'&') {
        return None;
    }
    for (name, character) in [
        (&b"&quot;"[..], b'"'),
        (b"&amp;", b'&'),
        (b"&lt;", b'<'),
        (b"&gt;", b'>'),
        (b"&apos;", b'\''),
    ] {
        if text.starts_with(name) {
            return Some((character, name.len()));
        }
    }
    let (radix, digits_start) = match text.get(1..3)? {
        [b'#', b'x' | b'X'] => (16, 3),
        [b'#', _] => (10, 2),
        _ => return None,
    };
    let digits = text
        .get(digits_start..)?
        .iter()
        .take(8)
        .take_while(|byte| char::from(**byte).is_digit(radix))
        .count();
    if digits == 0 || digits > 7 || text.get(digits_start + digits) != Some(&b';') {
        return None;
    }
    let number = std::str::from_utf8(&text[digits_start..digits_start + digits]).ok()?;
    let value = u32::from_str_radix(number, radix).ok()?;
    Some((u8::try_from(value).ok()?, digits_start + digits + 1))
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
    fn a_raw_key_is_found_where_its_first_bytes_read_as_the_tail_of_an_escape() {
        // Found by proptest: a key that starts with hex digits, right after a `%` (or `\u00`),
        // is still there for anyone who reads the bytes...
        assert_eq!(found("a0", "%a0"), Some("a0"));
        assert_eq!(found("ab12cd34ef", "100%ab12cd34ef"), Some("ab12cd34ef"));
        assert_eq!(found("41key", r"\u0041key"), Some("41key"));
        // ...but the tail of an escape does not start a spelled one: `;&#65;` is not `;A` here.
        assert_eq!(found(";A", "&#33;&#65;"), None);
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
        let plus = EchoFinder::new(b"ab+cd");
        assert_eq!(plus.find(b"{\"k\":\"ab cd\"}"), Some(6..11), "a form-decoded +");
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
    fn html_double_percent_and_script_escapes_are_found_too() {
        let key = "pk/a'b&c<d";
        for spelled in [
            "pk&#47;a&#39;b&amp;c&lt;d",
            "pk&#x2F;a&apos;b&#X26;c&#x3c;d",
            "pk%252Fa%2527b%2526c%253Cd",
            r"pk\x2fa\'b\x26c\x3Cd",
            r"pk\u{2f}a\u{27}b\u{0026}c\u{3C}d",
            "pk&#0000047;a'b&c<d",
        ] {
            assert_eq!(found(key, spelled), Some(spelled), "{spelled}");
        }
        for near_miss in [
            "pk&#47a'b&c<d",
            "pk&#x2G;a'b&c<d",
            "pk&slash;a'b&c<d",
            "pk&#00000047;a'b&c<d",
        ] {
            assert_eq!(found(key, near_miss), None, "{near_miss}");
        }
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
        DoublePercent,
        HexEscape,
        HtmlDecimal,
        HtmlHex,
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
                Spelling::DoublePercent => format!("%25{byte:02X}"),
                Spelling::HexEscape => format!("\\x{byte:02x}"),
                Spelling::HtmlDecimal => format!("&#{byte};"),
                Spelling::HtmlHex => format!("&#x{byte:X};"),
            })
            .collect()
    }

    /// One to eight spellings, used in turn for a key's characters.
    fn spellings() -> impl Strategy<Value = Vec<Spelling>> {
        let one = prop_oneof![
            Just(Spelling::Raw),
            Just(Spelling::JsonShort),
            Just(Spelling::JsonUnicodeLower),
            Just(Spelling::JsonUnicodeUpper),
            Just(Spelling::Percent),
            Just(Spelling::EscapedPercent),
            Just(Spelling::DoublePercent),
            Just(Spelling::HexEscape),
            Just(Spelling::HtmlDecimal),
            Just(Spelling::HtmlHex),
        ];
        proptest::collection::vec(one, 1..8)
    }

    proptest! {
        #[test]
        fn any_mix_of_spellings_is_found(
            key in "[!-~]{1,40}",
            spellings in spellings(),
            before in "[ -~]{0,30}",
            after in "[ -~]{0,30}",
        ) {
            let spelled = spell(&key, &spellings);
            // A space ends whatever `before` holds, so it cannot swallow the echo's first bytes
            // into an escape of its own (`%0` + `0…` reads `%00`…): the echo starts a token.
            let haystack = format!("{before} {spelled}{after}");
            let finder = EchoFinder::new(key.as_bytes());
            let range = finder.find(haystack.as_bytes());
            prop_assert!(range.is_some(), "{spelled:?} not found in {haystack:?}");
            // Found no later than where it was put (an earlier echo may come from `before`).
            let range = range.unwrap_or_default();
            prop_assert!(range.start <= before.len() + 1, "{range:?} in {haystack:?}");
        }

        #[test]
        fn a_key_with_one_character_changed_is_found_in_no_spelling(
            key in "[!-$'-\\[\\]-~]{2,40}",
            at in any::<proptest::sample::Index>(),
            replacement in "[!-$'-\\[\\]-~]",
            spellings in spellings(),
        ) {
            // Keys and replacements without `%`, `&` and `\`, so a haystack has one reading only.
            let at = at.index(key.len());
            let mut changed = key.clone().into_bytes();
            let replacement = replacement.as_bytes()[0];
            prop_assume!(changed[at] != replacement);
            changed[at] = replacement;
            let changed = String::from_utf8(changed).expect("ASCII");
            let haystack = spell(&changed, &spellings);
            // The raw key is an echo wherever it stands, even across the end of an escape
            // (`&#48;a` holds the key `;a`).
            prop_assume!(!haystack.contains(key.as_str()));
            prop_assert_eq!(EchoFinder::new(key.as_bytes()).find(haystack.as_bytes()), None, "{}", haystack);
        }
    }
}
