//! Prints every change of a team's environments as it happens: first the
//! current ones, a line when they are all listed, then each change
//! (`<name> <STATE> <progress>%`), resuming by itself after a gateway restart.
//!
//! VIBEBOX_URL (default http://127.0.0.1:7700), VIBEBOX_TOKEN and VIBEBOX_TEAM
//! (a team id): `cargo run -p vibebox-client --example watch`.

use futures::StreamExt;
use std::env::var;
use vibebox_client::{Client, state_name};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = var("VIBEBOX_URL").unwrap_or_else(|_| "http://127.0.0.1:7700".into());
    let client = Client::connect(url).token(var("VIBEBOX_TOKEN")?).build()?;
    let mut events = std::pin::pin!(client.watch_environments_from(var("VIBEBOX_TEAM")?, ""));
    while let Some(event) = events.next().await {
        let event = event?;
        if let Some(env) = event.environment {
            let state = state_name(env.state);
            println!("{} {state} {}%", env.name, env.progress_percent);
        } else if event.caught_up {
            println!("-- caught up, live changes follow");
        }
    }
    Ok(())
}
