//! Strings from a payload in error messages: a short excerpt at most, so that a field a
//! megabyte long is not copied into every log line, parked message header and HTTP answer.

use std::fmt::Display;

/// The most characters of a payload string an error message quotes.
pub const QUOTE_CHARS: usize = 64;

/// The most characters of a parser's message (which may quote the payload) kept.
pub const MESSAGE_CHARS: usize = 4 * QUOTE_CHARS;

/// `text` quoted as `{:?}` shows it, cut after [`QUOTE_CHARS`] characters, saying how long it
/// was.
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

/// A message that may quote a payload (a JSON parser's, say), cut after [`MESSAGE_CHARS`]
/// characters.
pub fn cut(message: impl Display) -> String {
    let message = message.to_string();
    match message.char_indices().nth(MESSAGE_CHARS) {
        None => message,
        Some((end, _)) => format!("{}…", &message[..end]),
    }
}

/// `text` with its control characters (line breaks, terminal escapes, bidirectional marks)
/// written as escapes, for a line a person reads: a value from a message cannot start a line of
/// its own or restyle the terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escape = c.is_control() || matches!(c, '\u{200e}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            let shown: Vec<char> = match escape {
                true => c.escape_unicode().collect(),
                false => vec![c],
            };
            shown
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_as_escapes() {
        assert_eq!(printable("library/nginx é"), "library/nginx é");
        assert_eq!(
            printable("a\nb\u{1b}[31m\u{202e}"),
            "a\\u{a}b\\u{1b}[31m\\u{202e}"
        );
    }

    #[test]
    fn short_strings_are_quoted_whole_and_long_ones_cut_with_their_length() {
        assert_eq!(quoted("library/nginx"), "\"library/nginx\"");
        let long = "é".repeat(1000);
        let shown = quoted(&long);
        assert!(
            shown.starts_with(&format!("\"{}\"…", "é".repeat(QUOTE_CHARS))),
            "{shown}"
        );
        assert!(shown.ends_with("(2000 bytes)"), "{shown}");
        assert_eq!(cut("invalid type"), "invalid type");
        assert_eq!(cut("x".repeat(10_000)).chars().count(), MESSAGE_CHARS + 1);
    }
}
