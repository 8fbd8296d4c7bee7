"""benchmarks/pipeline.py: each rule's job-minutes from snakemake's log, on a hand-written log."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from pipeline import job_minutes  # noqa: E402

LOG = """\
Select jobs to execute...
Execute 2 jobs...

[Thu Dec  3 18:00:00 2026]
rule pretrain_backbone:
    output: results/backbones/a/ready
    jobid: 7
    reason: Missing output files
[Thu Dec  3 18:00:30 2026]
localrule make_world:
    jobid: 3
[Thu Dec  3 18:01:30 2026]
Finished jobid: 3 (Rule: make_world)
1 of 4 steps (25%) done

[Thu Dec  3 18:02:00 2026]
rule pretrain_backbone:
    jobid: 8
[Thu Dec  3 18:10:00 2026]
Finished jobid: 7 (Rule: pretrain_backbone)
[Thu Dec  3 18:12:30 2026]
Finished jobid: 8 (Rule: pretrain_backbone)
"""


def test_each_rule_sums_its_jobs_from_start_stamp_to_finish_stamp():
    minutes = job_minutes(LOG.splitlines(keepends=True))
    # pretrain: 18:00:00-18:10:00 and 18:02:00-18:12:30; make_world: 18:00:30-18:01:30
    assert minutes == {"pretrain_backbone": {"jobs": 2, "minutes": 20.5}, "make_world": {"jobs": 1, "minutes": 1.0}}
    assert list(minutes) == ["pretrain_backbone", "make_world"]  # the costliest first
