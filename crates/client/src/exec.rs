//! A non-interactive Exec: start, input (if any), end of input, then the
//! output until the exit message.

use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{ExecRequest, ExecStart, exec_request, exec_response};

use crate::AuthedChannel;
use crate::error::{Error, Result};

/// Input is sent in messages of at most this size.
const STDIN_CHUNK: usize = 64 * 1024;

/// What a finished command left: its exit code and its output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's exit code (as the environment reported it).
    pub exit_code: i32,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Whether the command exited with 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }
}

/// The request messages of a non-interactive exec.
fn requests(mut start: ExecStart, stdin: Option<Vec<u8>>) -> Vec<ExecRequest> {
    let message = |m| ExecRequest { message: Some(m) };
    start.stdin = stdin.is_some();
    let mut out = vec![message(exec_request::Message::Start(start))];
    for chunk in stdin.unwrap_or_default().chunks(STDIN_CHUNK) {
        out.push(message(exec_request::Message::Stdin(chunk.to_vec())));
    }
    out.push(message(exec_request::Message::CloseStdin(true)));
    out
}

/// Runs the exec and collects its output.
pub(crate) async fn run(
    mut client: EnvironmentServiceClient<AuthedChannel>,
    start: ExecStart,
    stdin: Option<Vec<u8>>,
) -> Result<ExecOutput> {
    let outbound = futures::stream::iter(requests(start, stdin));
    let mut inbound = client.exec(outbound).await?.into_inner();
    let mut output = ExecOutput::default();
    while let Some(message) = inbound.message().await? {
        match message.message {
            Some(exec_response::Message::Stdout(bytes)) => output.stdout.extend_from_slice(&bytes),
            Some(exec_response::Message::Stderr(bytes)) => output.stderr.extend_from_slice(&bytes),
            Some(exec_response::Message::Exit(exit)) => {
                output.exit_code = exit.exit_code;
                return Ok(output);
            }
            None => {}
        }
    }
    Err(Error::ExecIncomplete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_comes_first_and_input_ends_with_close_stdin() {
        let start = ExecStart {
            environment_id: "e".into(),
            command: vec!["cat".into()],
            ..Default::default()
        };
        let plain = requests(start.clone(), None);
        assert_eq!(plain.len(), 2);
        match &plain[0].message {
            Some(exec_request::Message::Start(s)) => assert!(!s.stdin, "no input attached"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            plain[1].message,
            Some(exec_request::Message::CloseStdin(true))
        );

        let input = vec![7u8; STDIN_CHUNK + 10];
        let fed = requests(start, Some(input.clone()));
        match &fed[0].message {
            Some(exec_request::Message::Start(s)) => assert!(s.stdin, "input attached"),
            other => panic!("{other:?}"),
        }
        let sent: Vec<u8> = fed[1..fed.len() - 1]
            .iter()
            .flat_map(|m| match &m.message {
                Some(exec_request::Message::Stdin(b)) => b.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent, input);
        assert_eq!(fed.len(), 4, "two chunks between start and close");
    }
}
