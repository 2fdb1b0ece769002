"""Move the `champion` alias by hand, roll it back, or list its history.

    python -m flows.promote --version 3 --reason "keeps mlops recall"
    python -m flows.promote --rollback
    python -m flows.promote --history

Every move is recorded in the registered model's history (tagifai/lifecycle/registry.py) with when, who,
from which version, to which, and why; the demo follows the alias.
"""

from __future__ import annotations

import sys

from mlflow.tracking import MlflowClient

from flows.cli import exit_on_user_error, parse_settings
from tagifai.lifecycle import registry, tracking
from tagifai.settings import PromoteSettings


def describe(move: dict) -> str:
    return (
        f"{move['at']}  {move['kind']:<8} {move['from'] or '-':>4} -> {move['to'] or '-':<4} by {move['by']}: "
        f"{move['reason']}"
    )


def main(argv: list[str] | None = None) -> dict | list:
    settings = parse_settings(PromoteSettings, argv, prog="python -m flows.promote", description=__doc__.split("\n")[0])
    with exit_on_user_error(code=2):
        tracking_uri = tracking.configured_tracking_uri(settings.tracking_uri)
        tracking.check_reachable(tracking_uri)
        client = MlflowClient(tracking_uri)
        if settings.history:
            moves = registry.history(client, settings.model_name)
            print("\n".join(describe(move) for move in moves) or f"no moves of {settings.model_name}@champion yet")
            return moves
        if settings.rollback:
            move = registry.rollback(client, settings.model_name, settings.reason or "rollback by hand")
        else:
            move = registry.move_alias(
                client, settings.model_name, settings.version, settings.reason or "by hand", "manual"
            )
    print(f"{settings.model_name}@champion: version {move['from'] or 'none'} -> version {move['to']}")
    return move


if __name__ == "__main__":
    main(sys.argv[1:])
