#!/usr/bin/env bash
# Mutation testing of the modules whose mistakes ship as wrong verdicts (issue 15; docs/testing.md,
# "Mutation testing"). Not part of the test command or CI: under 5 minutes on one core.
#
#   tools/mutation.sh                      # all configured mutants, from scratch, then the score table
#   tools/mutation.sh 'service.decide.*'   # only these mutants (mutmut's names; keeps earlier results)
#   MUTMUT_CPU=1 MUTMUT_CHILDREN=1 tools/mutation.sh   # pin to a core / number of workers
#
# What is mutated and which tests run: [tool.mutmut] in pyproject.toml. mutmut works in ./mutants/
# (git-ignored); `.venv/bin/mutmut show NAME` prints a mutant's diff, `.venv/bin/mutmut results` the survivors.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
pin=()
if [[ -n "${MUTMUT_CPU:-}" ]]; then pin=(taskset -c "$MUTMUT_CPU"); fi
if [[ $# -eq 0 ]]; then
  rm -rf mutants
  # of models/ira_cnn.py only the in-graph gradient (the rest builds the network: not in issue 15's set)
  set -- 'service.*' 'models.saliency.*' 'models.ira_cnn.xǁIRAHeadǁforward_with_grad__mutmut_*' \
         'models.ira_cnn.xǁIRAHeadǁ_pool_and_argmax__mutmut_*'
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # torch forks one worker per mutant
"${pin[@]}" "$venv/bin/mutmut" run --max-children "${MUTMUT_CHILDREN:-1}" "$@"
"$venv/bin/python" tools/mutation_scores.py
