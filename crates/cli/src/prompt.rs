//! Reading secrets and answers from the user: a password without echo from
//! the terminal (`rpassword`, which decodes UTF-8, so `pässwörd` arrives as
//! typed), or one line from stdin (`--password-stdin`, for scripts).

use std::io::{BufRead, IsTerminal};

use anyhow::{Context as _, Result, bail};

/// Reads a password without echo from the terminal.
///
/// Ctrl-C at the prompt interrupts the CLI like any terminal program
/// (SIGINT); backspace removes the last character, not the last byte.
pub(crate) fn prompt_password(prompt: &str) -> Result<String> {
    // rpassword reads /dev/tty whatever stdin is; a piped stdin means a script,
    // which must say so with --password-stdin rather than hang on a prompt.
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to read the password from: use --password-stdin");
    }
    read_password(prompt, rpassword::ConfigBuilder::new().build())
}

/// Prompts and reads one password as `config` says (the terminal by default).
fn read_password(prompt: &str, config: rpassword::Config) -> Result<String> {
    rpassword::prompt_password_with_config(prompt, config).context("reading the password")
}

/// Reads one line from stdin, without its line ending.
pub(crate) fn read_line_stdin() -> Result<String> {
    read_line(&mut std::io::stdin().lock())
}

fn read_line(reader: &mut impl BufRead) -> Result<String> {
    let mut s = String::new();
    reader
        .read_line(&mut s)
        .context("reading a line from stdin")?;
    Ok(s.trim_end_matches(['\r', '\n']).to_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    const PASSWORD: &str = "pässwörd-密码-🔑";

    fn typed(input: &str) -> rpassword::Config {
        rpassword::ConfigBuilder::new()
            .input_reader(Cursor::new(input.as_bytes().to_vec()))
            .output_discard()
            .build()
    }

    #[test]
    fn non_ascii_password_from_the_prompt_round_trips() {
        let read = read_password("Password: ", typed(&format!("{PASSWORD}\n"))).unwrap();
        assert_eq!(read, PASSWORD);
        // The terminal may send CR for Enter.
        let read = read_password("Password: ", typed(&format!("{PASSWORD}\r"))).unwrap();
        assert_eq!(read, PASSWORD);
    }

    #[test]
    fn backspace_removes_a_whole_character() {
        // "pä", DEL, "a": a byte-wise prompt would leave half of "ä" behind.
        let read = read_password("Password: ", typed("pä\x7fa\n")).unwrap();
        assert_eq!(read, "pa");
    }

    #[test]
    fn non_ascii_password_from_stdin_round_trips() {
        let mut input = Cursor::new(format!("{PASSWORD}\r\nnext line\n").into_bytes());
        assert_eq!(read_line(&mut input).unwrap(), PASSWORD);
        assert_eq!(read_line(&mut input).unwrap(), "next line");
    }

    #[test]
    fn invalid_utf8_on_stdin_is_an_error_not_a_mangled_password() {
        let mut input = Cursor::new(b"p\xffw\n".to_vec());
        assert!(read_line(&mut input).is_err());
    }
}
