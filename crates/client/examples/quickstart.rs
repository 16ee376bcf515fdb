//! Creates an environment, waits for it, runs a command in it and deletes it.
//!
//! VIBEBOX_URL (default http://127.0.0.1:7700), VIBEBOX_TOKEN and VIBEBOX_TEAM
//! (a team id) say where and as whom:
//! `cargo run -p vibebox-client --example quickstart`.

use std::{env::var, time::Duration};
use vibebox_client::{Client, create_request, state_name};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = var("VIBEBOX_URL").unwrap_or_else(|_| "http://127.0.0.1:7700".into());
    let client = Client::connect(url).token(var("VIBEBOX_TOKEN")?).build()?;
    let request = create_request(&var("VIBEBOX_TEAM")?, "quickstart-rust", "vibebox/devbox:1");
    let timeout = Duration::from_secs(300);
    let env = client.create_environment_and_wait(request, timeout).await?;
    println!("{} is {}", env.name, state_name(env.state));
    let out = client.exec(&env.id, ["echo", "hello"]).await?;
    println!("exit {}: {}", out.exit_code, out.stdout_lossy().trim_end());
    client.delete_environment(&env.id).await?;
    Ok(())
}
