"""The fresh-process start-up measurement: its protocol with the child, on a stand-in child (the real
one loads the model, which the soak on a GPU exercises)."""
import json

import pytest

from chatterbox_lab.measure import startup

STAND_IN = """
import json, os
print("loading", flush=True)
print("READY", flush=True)
print(json.dumps(dict(stages_s={{"load": 1.0}}, first_request_s=0.5,
                      caches=os.environ["TORCHINDUCTOR_CACHE_DIR"], preset={preset!r}, tokens={tokens})))
{tail}
"""


def stand_in(monkeypatch, tail=""):
    monkeypatch.setattr(startup, "CHILD", STAND_IN.replace("{tail}", tail))


def test_cold_then_warm_share_a_fresh_cache_folder(monkeypatch):
    stand_in(monkeypatch)
    starts = startup.cold_and_warm(preset="tiny", tokens=4)
    assert starts["cold"]["caches"] == starts["warm"]["caches"]
    assert "chatterbox_lab-startup-" in starts["cold"]["caches"]
    for start in starts.values():
        assert start["ready_s"] > 0 and start["stages_s"] == {"load": 1.0} and start["tokens"] == 4


def test_a_failed_start_is_an_error_not_a_figure(monkeypatch, tmp_path):
    stand_in(monkeypatch, tail="raise SystemExit(3)")
    with pytest.raises(RuntimeError, match="exit 3"):
        startup.start_once(str(tmp_path))
