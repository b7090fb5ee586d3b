"""``parity --engine`` and ``bench ENGINE`` measure an engine as it was compiled: the build options a user gives
them (``--pass-option``, ``--inductor-config``) must be what the engine's manifest records, else one ``L4Error``
(an option that contradicts the engine is an error, never silently dropped)."""
from __future__ import annotations

import json
from typing import Any

from l4compile.errors import L4Error


def check_build_options(manifest: dict, engine: str, pass_options: dict[str, dict[str, Any]],
                        inductor_configs: dict[str, Any]) -> None:
    """``pass_options`` / ``inductor_configs`` as parsed from the command line, against ``manifest`` (engine
    directory ``engine``): each is checked as a compile checks it, then compared with what the engine was built
    with (a setting the manifest does not record had its default)."""
    from l4compile import inductor_configs as ic
    from l4compile import pass_options as po
    from l4compile.passes import registered_passes
    from l4compile.pipeline import check_pass_options

    cc = manifest["compile_config"]
    drop = "drop it (the engine's own settings are used)"
    if pass_options:   # checked as the engine's compile would (its user passes, its skipped ones)
        check_pass_options(pass_options, tuple(cc.get("passes", ())), tuple(cc.get("skip_passes", ())))
        clash = po.engine_contradiction(pass_options, manifest, registered_passes())
        if clash:
            option, how = clash
            raise L4Error(f"--pass-option {option} contradicts engine {engine}, {how}; {drop}")
    configs = ic.check(inductor_configs, "inductor")
    if configs and manifest["backend"] != "inductor":
        raise L4Error(f"--inductor-config: {engine} is a {manifest['backend']} engine; Inductor settings apply to "
                      "inductor engines only")
    clash = ic.engine_contradiction(configs, cc.get("inductor_configs"))
    if clash:
        key, value, was = clash
        raise L4Error(f"--inductor-config {key}={json.dumps(value, default=repr)} contradicts engine {engine}, "
                      f"compiled with {key}={json.dumps(was, default=repr)}; {drop}")
