"""Importing llm_assets turns the Hugging Face Hub client offline and its telemetry off, unless the
user's environment says otherwise (TRL's trainers would otherwise report every run online)."""

import os
import subprocess
import sys

PROBE = ("import llm_assets, huggingface_hub.constants as c; "
         "print(c.HF_HUB_OFFLINE, c.HF_HUB_DISABLE_TELEMETRY)")


def probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_hub_offline_and_telemetry_off_by_default():
    assert probe() == "True True"


def test_the_users_environment_wins():
    assert probe(HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="0") == "False False"
