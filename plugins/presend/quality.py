"""The quality gate: the Great Expectations checkpoint in expectations/ over esp_merge_fields.

GX cannot validate DuckDB through SQLAlchemy (every metric fails), so the table is read from a
read-only DuckDB connection into a DataFrame and validated in memory. `great_expectations`
takes seconds to import: it is imported here, inside the gate, and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from presend import settings, warehouse

CHECKPOINT = "pre_send_gate"


class QualityGateError(RuntimeError):
    """A critical expectation failed: the push must not run."""


@dataclass
class QualityResult:
    rows: int = 0
    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    data_docs: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _describe(r) -> str:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    res = r.result or {}
    observed = res.get("observed_value")
    if observed is None and "unexpected_count" in res:
        # Counts only: the unexpected values themselves may be emails or names (PII).
        observed = f"{res['unexpected_count']} unexpected rows ({res.get('unexpected_percent')}%)"
    return f"{cfg.type}({kwargs}): observed {observed}"


def gate() -> QualityResult:
    """Validate esp_merge_fields; raise QualityGateError naming every failed expectation."""
    settings.disable_telemetry()
    gx_dir = settings.data_dir() / "gx"
    os.environ["PRESEND_GX_DIR"] = str(gx_dir)
    with warehouse.connect(read_only=True) as con:
        frame = con.sql("select * from esp_merge_fields").df()

    import great_expectations as gx

    context = gx.get_context(mode="file", context_root_dir=str(settings.EXPECTATIONS_DIR))
    run = context.checkpoints.get(CHECKPOINT).run(batch_parameters={"dataframe": frame})
    result = QualityResult(rows=len(frame), data_docs=str(gx_dir / "data_docs" / "index.html"))
    for validation in run.run_results.values():
        for r in validation.results:
            if r.success:
                result.passed += 1
            else:
                result.failed += 1
                result.failures.append(_describe(r))
    if result.failures:
        raise QualityGateError(
            f"{result.failed} expectation(s) failed on esp_merge_fields "
            f"({result.rows} rows); nothing is pushed. Data Docs: {result.data_docs}\n  - "
            + "\n  - ".join(result.failures)
        )
    return result
