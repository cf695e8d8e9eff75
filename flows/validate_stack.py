"""`validate-stack`: load, render and check a stack without touching any host.

CI runs it on every change to a stack file; operators run it from the UI before a deploy.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from hxp.errors import OutputCheckError
from hxp.graph import DependencyGraph
from hxp.io.validators import CheckResult
from hxp.plan import plan_stack
from hxp.render import TARGETS, Target
from tasks.stack import load_stack, render_target, verify_target


def _outcome(result: CheckResult) -> str:
    if result.skipped:
        return f"skipped: {result.skipped}"
    return "ok" if result.ok else "FAILED"


@flow(name="validate-stack", flow_run_name="validate-{stack_files[0]}", log_prints=False)
def validate_stack(
    stack_files: list[str],
    overrides: list[str] | None = None,
    targets: list[Target] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Validate a stack: merge its files, check the graph, render and verify every target.

    Args:
        stack_files: Stack files in merge order; a later file wins (paths on the worker).
        overrides: `path.to.key=value` overrides applied last, like `hxp --set`.
        targets: Render targets to check (systemd, compose, k8s); all when empty.
        verify: Run the external validators (systemd-analyze, compose, kubernetes-validate).
    """
    logger = get_run_logger()
    effective = load_stack(stack_files, list(overrides or []))
    stack = effective.stack
    graph = DependencyGraph(stack.dependencies())
    plan = plan_stack(stack, {}, effective.content_hash)
    chosen: list[Target] = list(targets or TARGETS)
    rendered = {t: render_target(effective, t) for t in chosen}
    results = {t: verify_target(files, t) for t, files in rendered.items()} if verify else {}
    rows = [f"| {t} | {r.check} | {_outcome(r)} |" for t, rs in results.items() for r in rs]
    problems = [f"{r.check}: {p}" for rs in results.values() for r in rs for p in r.problems]
    create_markdown_artifact(
        key=f"validate-{stack.stack}",
        description=f"Validation of stack {stack.stack}",
        markdown="\n".join(
            [
                f"# Stack `{stack.stack}` — config `{effective.content_hash[:12]}`",
                f"Start order: {' → '.join(graph.order())}",
                "",
                "| target | check | result |",
                "|---|---|---|",
                *rows,
                "",
                "```",
                plan.summary(),
                "```",
            ]
        ),
    )
    for notice in effective.notices:
        logger.warning(notice)
    if problems:
        raise OutputCheckError(problems)
    logger.info("stack %s valid (config %s)", stack.stack, effective.content_hash[:12])
    return {
        "stack": stack.stack,
        "config_hash": effective.content_hash,
        "order": graph.order(),
        "files": {t: [f.path for f in files] for t, files in rendered.items()},
        "checks": {t: {r.check: r.ok for r in rs} for t, rs in results.items()},
    }


if __name__ == "__main__":
    import sys

    validate_stack(sys.argv[1:] or ["examples/demo/stack.yaml"])
