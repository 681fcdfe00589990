"""The multi-node accelerate profile (training/accelerate/multi_node.yaml), checked offline: a
multi-machine DDP config accelerate itself loads, refused by the pipeline's launcher, and the
per-node commands docs/scaling.md gives for it parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.deploy_helpers import ROOT

MULTI_NODE = ROOT / "training" / "accelerate" / "multi_node.yaml"
SCALING = ROOT / "docs" / "scaling.md"


# ── multi-node accelerate profile ─────────────────────────────────────────────────────────────
def test_multi_node_profile_is_a_multi_machine_ddp_config():
    from accelerate.commands.config.config_args import ClusterConfig

    text = MULTI_NODE.read_text()
    assert text.startswith("# ")
    settings = yaml.safe_load(text)
    assert settings["compute_environment"] == "LOCAL_MACHINE"
    assert settings["distributed_type"] == "MULTI_GPU" and settings["use_cpu"] is False
    assert settings["num_machines"] == 2 and settings["same_network"] is True
    assert settings["rdzv_backend"] in ("static", "c10d")
    assert settings["mixed_precision"] == "bf16"
    assert settings["num_processes"] % settings["num_machines"] == 0
    config = ClusterConfig.from_yaml_file(str(MULTI_NODE))  # accelerate's own loader
    assert config.num_machines == 2 and config.main_process_port == 29500


def test_multi_node_profile_is_refused_by_the_pipeline_launcher():
    """One process cannot start the ranks on other machines: the launcher refuses the profile
    on any machine, GPUs or not, and points at the per-node commands."""
    from training.launch import ProfileUnavailable, num_processes_for

    for gpus in (0, 8):
        with pytest.raises(ProfileUnavailable) as err:
            num_processes_for("multi_node", {}, gpus=gpus)
        assert "spans 2 machines" in err.value.reason
        assert "docs/scaling.md" in err.value.reason


def test_the_documented_multi_node_commands_parse():
    """Each `accelerate launch` command in docs/scaling.md parses with accelerate's own parser
    and names this profile, a distinct machine rank, and the same rendezvous point."""
    from accelerate.commands.launch import launch_command_parser

    text = SCALING.read_text()
    commands = [" ".join(part.strip().rstrip("\\") for part in block.splitlines())
                for block in re.findall(r"^accelerate launch .*?(?<!\\)$", text,
                                        re.MULTILINE | re.DOTALL)]
    commands = [c for c in commands if "multi_node.yaml" in c]
    assert len(commands) == 2, commands
    parser = launch_command_parser()
    ranks = set()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[2:])
        assert Path(ROOT / args.config_file) == MULTI_NODE
        assert args.module and args.training_script == "training.sft"
        assert (args.num_processes, args.main_process_ip, args.main_process_port) == \
            (16, "HOST", 29500)
        ranks.add(args.machine_rank)
    assert ranks == {0, 1}
