"""Creates an environment, waits for it, runs a command in it and deletes it.

VIBEBOX_URL (default http://127.0.0.1:7700), VIBEBOX_TOKEN and VIBEBOX_TEAM
(a team id) say where and as whom: ``python examples/quickstart.py``.
"""
import os

import vibebox

client = vibebox.Client(os.environ.get("VIBEBOX_URL", "http://127.0.0.1:7700"),
                        os.environ["VIBEBOX_TOKEN"])
env = client.create_environment(os.environ["VIBEBOX_TEAM"], "quickstart-python", "vibebox/devbox:1")
env = client.wait(env.id, timeout=300)
print(env.name, "is", vibebox.state_name(env.state))
result = client.exec(env.id, ["echo", "hello"])
print(f"exit {result.exit_code}: {result.stdout_text.strip()}")
client.delete_environment(env.id)
