"""`replay score`: verify every unscored rollout of a round with math-verify in worker processes.

Verdicts are appended in chunks, so an interrupted run loses at most the chunk in flight and a
rerun scores only what has no verdict yet. `--rescore` re-verifies every rollout that has no
verdict from the *current* verifier version (e.g. after upgrading math-verify); the views then
take the newest verdict per rollout. `--shard i/n` scores only the rollouts whose prompt_id falls
in shard i (the split of `replay generate --shard`), so n workers together score a round exactly
once. Each run ends by writing the round's group summary (replay/summary.py) unless a current one
exists. Never imports torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from replay import keys
from replay.errors import ReplayError
from replay.locks import lock_holder, locked_stage, stage_manifests, unfinished_stages
from replay.manifests import finish_manifest, record_run, start_manifest
from replay.progress import progress_bar
from replay.store import Store, utc_now
from replay.runtime import usable_cpus
from replay.summary import refresh as refresh_summary
from replay.verify import VERIFIER_NAME, VerifierPool, verifier_version

@dataclass
class ScoreConfig:
    round: int = 0
    workers: int | None = None  # None: one per usable CPU (replay.runtime.usable_cpus)
    timeout: float = 10.0  # hard wall-clock backstop per answer, seconds
    rescore: bool = False
    chunk_size: int = 2000  # verdicts per written part file
    stage: str = "score"
    shard: str = "0/1"  # i/n: only the rollouts of prompts in shard i (keys.shard_of)
    partial: bool = False  # score the round while its generate/import is unfinished (what is stored now)

    def validate(self) -> None:
        """The settings alone, before any file is touched (locked_stage calls it before the lock)."""
        if self.round < 0:
            raise ReplayError(f"--round must be 0 or more, got {self.round}")
        if not 0 < self.timeout < float("inf"):  # `not` also refuses nan
            raise ReplayError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        cap = max_workers()
        if self.workers is not None and not 1 <= self.workers <= cap:
            raise ReplayError(f"--workers must be between 1 and {cap} (4 per CPU, at most {WORKER_CAP}), "
                              f"got {self.workers}")
        if self.chunk_size < 1:
            raise ReplayError(f"chunk_size must be at least 1, got {self.chunk_size}")
        keys.parse_shard(self.shard)


WORKER_CAP = 256  # verifier processes: each is a Python interpreter; 100 000 of them never finish starting


def max_workers() -> int:
    return min(WORKER_CAP, 4 * (os.cpu_count() or 1))


WRITERS = ("generate", "import")


def refuse_unfinished_writers(store: Store, round: int) -> None:
    """Score records a round complete: refuse while the round's rollouts may still grow, so the record
    never covers part of a round without saying so: a generate or import holding the round's rollouts
    lock, a generate/import manifest that is not complete or a shard that has none, or rollouts that no
    manifest accounts for (a run killed before its manifest). `--partial` scores what is stored."""
    how = ("let it finish (or rerun it to finish the round), then score; --partial scores what is stored "
           "now")
    holder = lock_holder(store.root, round, "rollouts")
    if holder:
        raise ReplayError(f"round {round} is still being written ({holder}): score would record it complete "
                          f"with part of its rollouts; {how}")
    if not stage_manifests(store.root, round, WRITERS):
        raise ReplayError(f"round {round} has rollouts but no generate or import manifest: the run that wrote "
                          f"them did not finish (killed?); rerun that generate or import to finish the round, "
                          f"or pass --partial to score what is stored now")
    unfinished = unfinished_stages(store.root, round, WRITERS)
    if unfinished:
        raise ReplayError(f"round {round} is not completely written: {'; '.join(unfinished)}; {how}")


def pending_rollouts(store: Store, round: int, version: str, rescore: bool, shard: tuple[int, int] = (0, 1)):
    """Rollouts of the round (and shard) still to verify, with their gold answers (no token columns)."""
    already = ("SELECT 1 FROM verdicts v WHERE v.round = r.round AND v.prompt_id = r.prompt_id "
               "AND v.sample_idx = r.sample_idx" + (" AND v.verifier_version = ?" if rescore else ""))
    sql = (f"SELECT r.round, r.prompt_id, r.sample_idx, r.rollout_id, r.completion_text, p.answer "
           f"FROM rollouts r LEFT JOIN (SELECT DISTINCT ON (prompt_id) prompt_id, answer FROM prompts) p "
           f"USING (prompt_id) WHERE r.round = ? AND NOT EXISTS ({already}) ORDER BY r.prompt_id, r.sample_idx")
    params = [round, version] if rescore else [round]
    rows = store.query(sql, params).to_pylist()
    return [row for row in rows if keys.in_shard(row["prompt_id"], *shard)]


def rollout_counts(store: Store, round: int) -> dict[str, int]:
    """prompt_id -> number of rollouts of the round."""
    rows = store.query("SELECT prompt_id, count(*) AS n FROM rollouts WHERE round = ? GROUP BY prompt_id", [round])
    return dict(zip(rows.column("prompt_id").to_pylist(), rows.column("n").to_pylist()))


def verdict_row(rollout: dict, verdict, version: str) -> dict:
    return dict(round=rollout["round"], prompt_id=rollout["prompt_id"], sample_idx=rollout["sample_idx"],
                rollout_id=rollout["rollout_id"], correct=bool(verdict.correct), reward=float(verdict.reward),
                status=verdict.status, extracted_answer=verdict.extracted_answer, error=verdict.error,
                verifier=VERIFIER_NAME, verifier_version=version, latency_ms=float(verdict.latency_ms),
                scored_at=utc_now())


@locked_stage("verdicts", "score")
def run(store_path: str, cfg: ScoreConfig) -> dict:
    shard = keys.parse_shard(cfg.shard)
    stage = keys.shard_stage(cfg.stage, *shard)
    store = Store.open(store_path)
    version = verifier_version()
    workers = cfg.workers or usable_cpus()
    record = start_manifest(stage, cfg.round, asdict(cfg) | {"workers": workers})
    counts_by_prompt = rollout_counts(store, cfg.round)
    if not counts_by_prompt:  # the whole round, not the shard: few prompts can leave a shard empty
        raise ReplayError(f"round {cfg.round} has no rollouts in {store.root}: run `replay generate` "
                          f"or `replay import` first")
    if not cfg.partial:
        refuse_unfinished_writers(store, cfg.round)
    total = sum(n for pid, n in counts_by_prompt.items() if keys.in_shard(pid, *shard))
    todo = pending_rollouts(store, cfg.round, version, cfg.rescore, shard)
    statuses: dict[str, int] = {}
    correct = 0
    with progress_bar(f"{cfg.stage} round {cfg.round}", total=total, done=total - len(todo), unit="verdicts") as bar, \
            VerifierPool(workers=workers, timeout=cfg.timeout) as pool:
        for start in range(0, len(todo), cfg.chunk_size):
            chunk = todo[start:start + cfg.chunk_size]
            items = ((i, row["answer"], row["completion_text"]) for i, row in enumerate(chunk))
            rows = []
            for verdict in pool.verify_many(items):
                rows.append(verdict_row(chunk[verdict.key], verdict, version))
                statuses[verdict.status] = statuses.get(verdict.status, 0) + 1
                correct += bool(verdict.correct)
                bar.advance(1, f"{correct} correct")
            store.write("verdicts", rows, round=cfg.round)
    # the whole round's group summary, also when this run scored nothing (it backfills older stores)
    refresh_summary(store, cfg.round)
    counts = {"rollouts": total, "scored": len(todo), "correct": correct, "statuses": statuses,
              "already_scored": total - len(todo)}
    record = finish_manifest(record, counts, {"verifier": VERIFIER_NAME, "verifier_version": version})
    return record_run(store, cfg.round, stage, record, did_work=bool(todo))
