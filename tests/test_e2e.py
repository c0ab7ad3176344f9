"""The whole pipeline, shrunk: dev/runcpu.sh itself (the README's main job) at tiny sizes, from the data shipped in
the repo to report.md, then a chat reply from the result through the OpenAI endpoint of scripts/chat_web.py and
through scripts/chat_cli.py. Minutes, not the demo's half hour: 20 pretraining steps and a few per later stage,
so it checks that every stage runs, hands its output to the next and is reported, not that the model learns
(dev/BENCHMARKS.md has the full demo's numbers)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_chat_web import free_port, wait_until_up

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = {"DEMO_BASE_STEPS": "20", "DEMO_MID_STEPS": "4", "DEMO_SFT_STEPS": "4", "DEMO_RL_STEPS": "2",
             "DEMO_EVAL_PROBLEMS": "4", "DEMO_CORE_PER_TASK": "2"}
NUMBER = r"-?\d+(?:\.\d+)?"
SCORE = rf"{NUMBER} ± {NUMBER} \(n=\d+, base {NUMBER}\)\*?"  # chat_eval's line: accuracy ± SE, n, baseline


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if shutil.which("uv") is None and not (Path.home() / ".local" / "bin" / "uv").exists():
        pytest.skip("dev/runcpu.sh sets up with uv; run the suite with `bash dev/test.sh`, which installs it")
    base_dir = tmp_path_factory.mktemp("e2e") / "nanochat"
    env = {**os.environ, **TINY_DEMO, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("NANOCHAT_DATA_DIR", None)  # the demo's own default: the task data shipped in data/tasks
    result = subprocess.run(["bash", "dev/runcpu.sh"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=4000)  # ends only a demo that hangs
    assert result.returncode == 0, f"dev/runcpu.sh exited with {result.returncode}:\n{result.stdout[-6000:]}"
    return base_dir, result.stdout


@pytest.mark.slow
def test_every_stage_runs_and_the_report_summary_holds_numbers(demo):
    base_dir, output = demo
    stages = re.findall(r"^==== \d\d:\d\d:\d\d (.+)$", output, re.M)
    declared = re.findall(r'^stage "(.+)"$', (REPO_ROOT / "dev" / "runcpu.sh").read_text(encoding="utf-8"), re.M)
    assert stages == declared and stages[0] == "report reset" and stages[-1] == "report", stages  # every stage ran
    assert "error:" not in output

    report = (base_dir / "report" / "report.md").read_text(encoding="utf-8")
    summary = report.split("## Summary", 1)[1]
    assert summary.strip() in output  # the script's last lines show it to the user
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| Stage")}
    header = rows.pop("Metric")
    assert header == ["BASE", "MID", "SFT", "RL"], header
    core = next(label for label in rows if label.startswith("CORE"))
    assert re.fullmatch(r"CORE \(over \d+ of 22 tasks\)", core) and re.fullmatch(NUMBER, rows[core][0]), rows[core]
    spelling = rows["SpellingBee"]
    assert all(re.fullmatch(SCORE, cell) for cell in spelling[1:]), spelling  # evaluated after mid, SFT and RL
    assert all(re.fullmatch(SCORE, cell) for cell in rows["SimpleSpelling"][1:]), rows["SimpleSpelling"]
    bpb = re.search(rf"Base model val bpb: ({NUMBER}) \(unigram baseline: ({NUMBER})\)", summary)
    assert bpb and 0 < float(bpb.group(1)) and 0 < float(bpb.group(2)), summary
    assert re.search(r"Total wall clock time: (\d+h\d\dm|\d+m\d\ds|\d+s)$", summary, re.M)
    for plot in ("base_train_curve.png", "mid_train_curve.png", "chat_sft_curve.png", "chat_rl_curve.png"):
        assert (base_dir / "report" / plot).stat().st_size > 1000
    for line in ("python -m scripts.chat_cli -i rl", "python -m scripts.chat_web -i rl", "/v1/chat/completions"):
        assert line in output


@pytest.mark.slow
def test_the_result_answers_through_the_openai_endpoint_and_the_cli(demo):
    import openai

    base_dir, _ = demo
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    port = free_port()
    with open(base_dir / "chat_web.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "rl", "-p", str(port),
                                   "--host", "127.0.0.1"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, server)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model="nanochat", max_tokens=24, temperature=0,
                                                   messages=[{"role": "user", "content": "Spell the word: cat"}])
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert isinstance(reply.choices[0].message.content, str)
            assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
        finally:
            server.terminate()
            server.wait(timeout=30)

    cli = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-i", "rl", "-p", "How many r are in strawberry?",
                          "-t", "0", "-m", "24"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout.strip()
