"""Every launch script's dry run validates its whole configuration without GPUs."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def _dry_run(script, **env):
    full_env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **env)
    cmd = ["bash", os.path.join(ROOT, "examples", script)]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def _llama2(assets):
    return dict(TOKENIZER_TYPE="Llama2Tokenizer", TOKENIZER_MODEL=os.path.join(assets, "llama2", "tokenizer.model"))


@pytest.mark.parametrize("script,env,expect", [
    ("quickstart_cpu.sh", {}, ["world 2 = TP 1 x FPDT 2 x PP 1 x DP 1", "4096 tokens per rank in 4 chunks"]),
    ("llama3_8b_fpdt_2m_4gpu.sh", "llama2", ["world 4 = TP 1 x FPDT 4", "model: 7.",
                                             "524288 tokens per rank in 32 chunks", "sharding: FSDP2 over 4"]),
    ("gpt_2.7b_fpdt_2m_4gpu.sh", {}, ["world 4 = TP 1 x FPDT 4", "model: 2.", "GPT2BPETokenizer"]),
    ("llama3_70b_fpdt_4m_32gpu.sbatch", "llama2", ["world 32 = TP 1 x FPDT 32", "model: 6",
                                                   "131072 tokens per rank in 16 chunks", "sharding: FSDP2 over 32"]),
    ("llama3.1_8b_context_extension.sh", "llama2", ["== stage 1", "32768 tokens per rank in 4 chunks", "== stage 2",
                                                    "131072 tokens per rank in 8 chunks", "world 8 = TP 1 x FPDT 8"]),
])
def test_dry_run(assets, script, env, expect):
    env = _llama2(assets) if env == "llama2" else env
    proc = _dry_run(script, ASSETS=assets, **env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "dry run: the configuration is valid" in proc.stdout
    for text in expect:
        assert text in proc.stdout, proc.stdout


def test_dry_run_catches_a_missing_tokenizer_and_a_bad_layout(assets):
    proc = _dry_run("llama3_8b_fpdt_2m_4gpu.sh", TOKENIZER_TYPE="Llama2Tokenizer", TOKENIZER_MODEL="/nope/tok.model")
    assert proc.returncode == 2 and "/nope/tok.model does not exist" in proc.stderr
    proc = _dry_run("llama3_70b_fpdt_4m_32gpu.sbatch", NNODES="3", **_llama2(assets))  # 24 GPUs: FPDT 24
    assert proc.returncode == 2 and "not divisible" in proc.stderr, proc.stderr
