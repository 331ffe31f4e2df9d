"""Print the totals of the last `mutmut run` over the money paths and every survivor not known to be equivalent.

Reads mutmut's result files (mutants/*.py.meta); a survivor is matched against scripts/mutants-equivalent.txt
by its function and the lines the mutation wrote, so the list holds when code moves. Exit 1 on an unexplained
survivor. Usage: scripts/mutation_report.py [--seconds N] [MUTANT_GLOB...]; with no glob, every mutant that has a
verdict (the money functions scripts/mutate.sh ran, also over several runs).
"""
import argparse
import fnmatch
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / 'scripts' / 'mutants-equivalent.txt'
STATUS = {1: 'killed', 3: 'killed', 0: 'survived', 33: 'no tests', 5: 'no tests', 36: 'timeout', 24: 'timeout',
          -24: 'timeout', 152: 'timeout', 255: 'timeout', 37: 'type check', None: 'not checked'}


def results():
    """Yield (mutant name, exit code) of every mutant mutmut knows."""
    for meta in sorted((ROOT / 'mutants').glob('*.py.meta')):
        yield from json.loads(meta.read_text())['exit_code_by_key'].items()


def function_of(name):
    return re.sub(r'__mutmut_\d+$', '', name)


def written_lines(name):
    """Return the lines the mutant wrote ('+' lines of `mutmut show`), stripped and joined with ' ⏎ '."""
    shown = subprocess.run([str(ROOT / '.venv' / 'bin' / 'mutmut'), 'show', name], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    return ' ⏎ '.join(line[1:].strip() for line in shown.splitlines()
                      if line.startswith('+') and not line.startswith('+++'))


def equivalents():
    """Return {(function, written lines): reason} from the equivalents file (FUNCTION | LINES | REASON)."""
    known = {}
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.exists() else []:
        if line.strip() and not line.startswith('#'):
            function, written, reason = (part.strip() for part in line.split(' | ', 2))
            known[(function, written)] = reason
    return known


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--seconds', type=int, default=None)
    parser.add_argument('globs', nargs='*')
    args = parser.parse_args()
    chosen = [(name, code) for name, code in results()
              if any(fnmatch.fnmatch(name, glob) for glob in args.globs) or not args.globs and code is not None]
    statuses = Counter(STATUS.get(code, f'exit {code}') for _, code in chosen)
    known = equivalents()
    # a timeout is a mutant the tests stopped (a loop that never ends); anything unknown is looked at
    survivors = [name for name, code in chosen if STATUS.get(code, 'unknown') in ('survived', 'no tests', 'unknown')]
    unexplained, explained = [], []
    for name in sorted(survivors):
        written = written_lines(name)
        reason = known.get((function_of(name), written))
        (explained if reason else unexplained).append((name, written, reason))
    per_function = Counter(function_of(name) for name, _ in chosen)
    print(f'functions: {len(per_function)}  mutants: {len(chosen)}  ' +
          '  '.join(f'{status}: {count}' for status, count in sorted(statuses.items())) +
          (f'  time: {args.seconds // 60} min {args.seconds % 60} s' if args.seconds is not None else ''))
    print(f'survivors shown equivalent (scripts/mutants-equivalent.txt): {len(explained)}')
    for name, written, reason in explained:
        print(f'  = {name}: {written}  -- {reason}')
    print(f'unexplained survivors: {len(unexplained)}')
    for name, written, _ in unexplained:
        print(f'  ! {name} | {function_of(name)} | {written}')
    return 1 if unexplained else 0


if __name__ == '__main__':
    sys.exit(main())
