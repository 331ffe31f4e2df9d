"""CPU of the user lookup every update starts with (Shop.register's User.get_or_none), and what building its SQL costs.

    .venv/bin/python bench/user_lookup.py [--users 2000] [--calls 3000]

On a throwaway SQLite database: peewee's User.get_or_none(User.telegram_id == id) as the bot
runs it, peewee building that SELECT's SQL alone, and the same SELECT with its SQL built once
and only the parameter bound (a cursor and a User made from the row). This process's CPU per
call, the minimum of 3 rounds.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import models  # noqa: E402


def cpu(call, users, calls):
    best = float('inf')
    for _ in range(3):
        started = time.process_time()
        for i in range(calls):
            call(1000 + i % users)
        best = min(best, (time.process_time() - started) / calls * 1000)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--users', type=int, default=2000)
    parser.add_argument('--calls', type=int, default=3000)
    args = parser.parse_args()
    print(f'# user lookup: {common.machine_line()}')
    User = models.User
    with tempfile.TemporaryDirectory() as tmp:
        models.connect_database(f'sqlite:///{tmp}/lookup.db')
        models.create_schema()
        with models.db.atomic():
            User.insert_many([{'telegram_id': 1000 + i, 'panel_email': f'spn-{1000 + i}'}
                              for i in range(args.users)]).execute()
        sql, _ = User.select().where(User.telegram_id == 0).sql()
        names = [field.name for field in User._meta.sorted_fields]

        def prepared(telegram_id):
            row = models.db.execute_sql(sql, (telegram_id,)).fetchone()
            return User(**dict(zip(names, row)))

        for label, call in (('User.get_or_none (as Shop.register)', lambda tid: User.get_or_none(User.telegram_id == tid)),
                            ('building its SQL alone', lambda tid: User.select().where(User.telegram_id == tid).sql()),
                            ('SQL built once, parameter bound', prepared)):
            print(f'  {label:38} {cpu(call, args.users, args.calls):.3f} ms CPU a call')
        models.db.close()


if __name__ == '__main__':
    main()
