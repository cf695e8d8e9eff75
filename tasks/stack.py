"""Tasks that load, render and check a stack. Pure work lives in `hxp`; these only wrap it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hxp.config import EffectiveConfig, load_config_cached
from hxp.io.validators import CheckResult, check_rendered
from hxp.render import RenderedFile, Target, render_stack


@task(name="load-stack", cache_policy=NO_CACHE)
def load_stack(stack_files: list[str], overrides: list[str]) -> EffectiveConfig:
    """Read, merge and validate the stack files with their overrides (parsed once per content
    in a process: the run's name was made from the same files)."""
    return load_config_cached(stack_files, {}, overrides)


@task(name="render", task_run_name="render-{target}", cache_policy=NO_CACHE)
def render_target(effective: EffectiveConfig, target: Target) -> list[RenderedFile]:
    """Render every file of one target."""
    return render_stack(effective.stack, target)


@task(name="verify", task_run_name="verify-{target}", cache_policy=NO_CACHE)
def verify_target(files: list[RenderedFile], target: Target) -> list[CheckResult]:
    """Check rendered files with the real validators of their target."""
    return check_rendered(files, target)
