"""`valve-model train` with its initialisation taken apart: which draw stalls a run (a diagnostic, not a recipe).

    python tools/init_probe.py [--init-seed N | --init A --from-init B --modules stem,classifier] [--no-sign-fix]
                               -- <valve-model train options>

- ``--init-seed N``: the model's initialisation (and dropout) seeded by N instead of ``--seed``; the split, the
  draws and the augmentation keep ``--seed`` (``seed_everything(N)`` before the model is built).
- ``--init A --from-init B --modules M1,M2``: the model drawn with ``torch.manual_seed(A)``, its modules M1, M2
  (names as in ``model.get_submodule``: stem, block1, classifier, ...) replaced by those of the draw with seed
  B; the global RNG is then seeded with A + 1000 (dropout).
- ``--no-sign-fix``: the stem's first conv as drawn (``models.ira_cnn.ensure_both_polarities`` off).
- ``--stem-identity``: the stem's second 1x1 conv starts as the identity (``--stem-init identity``, train's default
  since 2026-11-30). Without it the probe passes ``--stem-init drawn``, as the runs in docs/results.md had it
  (they predate the option), unless the train options name ``--stem-init`` themselves.

docs/results.md ("The stem's signs") reads these runs with tools/early_epochs.py. Stop a run after the epochs
you need (the runs there were stopped after 2 or 3 of 60).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("give the train options after --, e.g. tools/init_probe.py --init-seed 1 -- --data ...")
    k = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init-seed", type=int, default=None)
    p.add_argument("--init", type=int, default=None)
    p.add_argument("--from-init", type=int, default=None)
    p.add_argument("--modules", default="")
    p.add_argument("--no-sign-fix", action="store_true")
    p.add_argument("--stem-identity", action="store_true")
    args = p.parse_args(argv[:k])
    if (args.init is None) != (args.from_init is None) or (args.init is not None and args.init_seed is not None):
        raise SystemExit("give --init-seed, or --init with --from-init (and --modules), not both")

    import torch

    import models.ira_cnn as M
    import models.train as T

    if args.no_sign_fix:
        M.ensure_both_polarities = lambda conv: False
    if args.init_seed is not None:
        seed_everything = T.seed_everything
        T.seed_everything = lambda seed: seed_everything(args.init_seed)
    if args.init is not None:
        build_model = T.build_model

        def build(mcfg):
            torch.manual_seed(args.init)
            a = build_model(mcfg)
            torch.manual_seed(args.from_init)
            b = build_model(mcfg)
            for name in filter(None, args.modules.split(",")):
                a.get_submodule(name).load_state_dict(b.get_submodule(name).state_dict())
            torch.manual_seed(args.init + 1000)
            return a

        T.build_model = build
    train_argv = argv[k + 1:]
    if "--stem-init" not in train_argv:
        train_argv += ["--stem-init", "identity" if args.stem_identity else "drawn"]
    return T.main(train_argv)


if __name__ == "__main__":
    sys.exit(main())
