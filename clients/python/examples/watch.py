"""Prints every change of a team's environments as it happens: first the
current ones, a line when they are all listed, then each change
(``<name> <STATE> <progress>%``), resuming by itself after a gateway restart.

VIBEBOX_URL (default http://127.0.0.1:7700), VIBEBOX_TOKEN and VIBEBOX_TEAM
(a team id): ``python examples/watch.py``.
"""
import os

import vibebox

client = vibebox.Client(os.environ.get("VIBEBOX_URL", "http://127.0.0.1:7700"),
                        os.environ["VIBEBOX_TOKEN"])
for event in client.watch_environment_events(os.environ["VIBEBOX_TEAM"]):
    if event.HasField("environment"):
        env = event.environment
        print(f"{env.name} {vibebox.state_name(env.state)} {env.progress_percent}%", flush=True)
    elif event.caught_up:
        print("-- caught up, live changes follow", flush=True)
