"""An Optuna study (TPE) over the [space] of a search, pruned by NASWOT, kept in SQLite.

Each trial's values are drawn by TPE (Bergstra et al., NeurIPS 2011; Optuna's default
sampler, seeded); with ``naswot_threshold`` set, a trial whose architecture scores below
it at initialisation (``naswot.py``) is pruned before any training. The study lives in
``workdir/study.db``: running the search again resumes it. A trial that was running when
the process was killed is marked failed and its values are queued first, so its
training resumes from its checkpoint (``trials.run_trial``). One process per study.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mlsurrogate.hpo.naswot import Architecture, combined, naswot_score
from mlsurrogate.hpo.trials import HpoConfig, naswot_inputs, run_trial, trial_config

STUDY_NAME = "mlsurrogate"


def _suggest(trial: Any, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, float(low), float(high), log=log)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise ValueError(
            "the Optuna study needs optuna: pip install optuna==5.1.0 (make venv installs it)"
        ) from exc
    return optuna


def _storage(config: HpoConfig) -> Any:
    optuna = _optuna()

    config.workdir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{config.workdir / 'study.db'}")


def open_study(config: HpoConfig, storage: Any = None) -> Any:
    """The study of ``config`` (created, or loaded from its SQLite file)."""
    optuna = _optuna()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage or _storage(config),
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
    )


def naswot_scorer(config: HpoConfig) -> Callable[[dict[str, Any]], float]:
    """values -> S' of the trial's architecture on one mini-batch of the training data."""
    batch, energies = naswot_inputs(config)

    def score(values: dict[str, Any]) -> float:
        settings = trial_config(config.base, values)
        architecture = Architecture(tuple(settings.hidden), settings.activation)
        return combined(
            naswot_score(architecture, batch, energies, config.naswot_initialisations, config.seed)
        )

    return score


def run_study(config: HpoConfig, log: Any = print) -> Any:
    """Run (or resume) the study until ``config.trials`` trials are finished (complete
    or pruned); return it."""
    optuna = _optuna()
    TrialState = optuna.trial.TrialState

    storage = _storage(config)
    study = open_study(config, storage)
    for killed in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(killed._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(killed.params)
        log(f"trial {killed.number} was interrupted: queued again with {killed.params}")
    scorer = naswot_scorer(config) if config.naswot_threshold is not None else None

    def objective(trial: Any) -> float:
        values = {name: _suggest(trial, name, spec) for name, spec in config.space.items()}
        if scorer is not None:
            score = scorer(values)
            trial.set_user_attr("naswot", score)
            if score < config.naswot_threshold:
                raise optuna.TrialPruned(f"NASWOT {score:.4g} < {config.naswot_threshold:.4g}")
        return run_trial(config, values)

    def report(study: Any, trial: Any) -> None:
        value = "pruned by NASWOT" if trial.state == TrialState.PRUNED else f"{trial.value:.4g}"
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = f"{study.best_value:.4g}" if completed else "none yet"
        log(f"trial {trial.number}: {trial.params} -> {value} (best {best})")

    done = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if done < config.trials:
        study.optimize(objective, n_trials=config.trials - done, callbacks=[report])
    return study


def format_study(study: Any, objective: str) -> str:
    """The trials as a Markdown table, best first."""
    from optuna.trial import TrialState

    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    names = sorted({name for t in trials for name in t.params})
    lines = [
        "| trial | " + " | ".join(names) + f" | NASWOT | {objective} |",
        "|---:|" + "---|" * len(names) + "---:|---:|",
    ]
    ordered = sorted(trials, key=lambda t: t.value if t.value is not None else math.inf)
    for t in ordered:
        cells = " | ".join(str(t.params.get(n, "")) for n in names)
        naswot = t.user_attrs.get("naswot")
        value = f"{t.value:.4g}" if t.state == TrialState.COMPLETE else "pruned"
        lines.append(
            f"| {t.number} | {cells} | {'' if naswot is None else f'{naswot:.4g}'} | {value} |"
        )
    return "\n".join(lines)
