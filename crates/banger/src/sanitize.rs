//! Guest output on the user's terminal: bytes a guest writes must not drive that terminal.
//!
//! A console log or a command's output may hold escape sequences: OSC 52 writes the
//! clipboard, CSI sequences clear the screen or move the cursor over earlier lines, some
//! terminals answer queries by typing into the shell. When such output goes to a terminal
//! (and not to a pty session, which is a terminal by intent, as with ssh), every control
//! character but newline, tab and carriage return is shown escaped, `\x1b` for ESC:
//! C0 controls (0x00-0x1f), DEL (0x7f), and the C1 controls U+0080-U+009F (UTF-8
//! `c2 80`-`c2 9f`; some terminals take U+009B as CSI). Carriage return is kept because
//! progress output uses it. Other bytes, invalid UTF-8 included, pass unchanged (a
//! terminal shows those as replacement characters). `--raw` keeps everything raw; output
//! that is not a terminal (a pipe, a file) is never touched.

/// Escapes control characters in a byte stream written in chunks.
#[derive(Debug, Default)]
pub struct Sanitizer {
    /// A `c2` lead byte that ended the last chunk: whether it starts a C1 control depends
    /// on the next byte.
    pending_c2: bool,
}

impl Sanitizer {
    /// Appends `input`, escaped, to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        let mut i = 0;
        if std::mem::take(&mut self.pending_c2) {
            match input.first() {
                None => {
                    self.pending_c2 = true;
                    return;
                }
                Some(&b) if (0x80..=0x9f).contains(&b) => {
                    escape(u32::from(b), out);
                    i = 1;
                }
                Some(_) => out.push(0xc2),
            }
        }
        while i < input.len() {
            let b = input[i];
            match b {
                b'\n' | b'\t' | b'\r' => out.push(b),
                0x00..=0x1f | 0x7f => escape(u32::from(b), out),
                0xc2 if i + 1 == input.len() => self.pending_c2 = true,
                0xc2 if (0x80..=0x9f).contains(&input[i + 1]) => {
                    escape(u32::from(input[i + 1]), out);
                    i += 1;
                }
                _ => out.push(b),
            }
            i += 1;
        }
    }

    /// What is held back at the end of the stream (a lone `c2`), to be written as is.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_c2) {
            out.push(0xc2);
        }
    }
}

fn escape(code: u32, out: &mut Vec<u8>) {
    if code < 0x80 {
        out.extend_from_slice(format!("\\x{code:02x}").as_bytes());
    } else {
        out.extend_from_slice(format!("\\u{{{code:x}}}").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = Sanitizer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            s.push(chunk, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn osc_52_and_csi_are_escaped_text_and_line_controls_are_not() {
        let osc52 = b"\x1b]52;c;aGVsbG8=\x07done\n";
        assert_eq!(clean(&[osc52]), b"\\x1b]52;c;aGVsbG8=\\x07done\n");
        assert_eq!(clean(&[b"\x1b[2J\x1b[H"]), b"\\x1b[2J\\x1b[H");
        assert_eq!(clean(&[b"a\tb\r\nc\n"]), b"a\tb\r\nc\n");
        assert_eq!(clean(&[b"\x00\x08\x7f"]), b"\\x00\\x08\\x7f");
        assert_eq!(
            clean(&["grüß ✓ 日本\n".as_bytes()]),
            "grüß ✓ 日本\n".as_bytes()
        );
        // Invalid UTF-8 passes: no control meaning.
        assert_eq!(clean(&[b"\xff\xfe"]), b"\xff\xfe");
    }

    #[test]
    fn c1_controls_are_escaped_even_split_across_chunks() {
        // U+009B is CSI to terminals that honour C1 controls.
        assert_eq!(clean(&[b"x\xc2\x9b2J"]), b"x\\u{9b}2J");
        assert_eq!(clean(&[b"x\xc2", b"\x9b2J"]), b"x\\u{9b}2J");
        // U+00A0 and U+00E9 are text.
        assert_eq!(clean(&[b"\xc2", b"\xa0\xc3\xa9"]), "\u{a0}é".as_bytes());
        assert_eq!(clean(&[b"\xc2"]), b"\xc2");
        assert_eq!(clean(&[b"\xc2", b"", b"\x85"]), b"\\u{85}");
    }
}
