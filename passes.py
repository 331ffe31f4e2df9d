"""Passes over the buyers by id, a bounded chunk of ids a round, whose place is kept in the `cursors` table.

A job that must now and then look at every buyer but nearly always finds nothing to do (is every active
buyer on a newly added panel? was every active buyer told their new link?) walks the users table in id
order: each round reads the ids (position, position + chunk] with the primary key and moves the cursor on;
once the pass has reached the newest buyer a round reads only the cursor and the newest id, plus the ids of
buyers registered since the last round. A pass that has reached the end starts again from the first buyer
`again_after` after it began, so a row missed by a path outside the job (a buyer granted days while the
panel was disabled, a backup restored) is still found.

The cursor row is the pass's only state: several processes take turns running a job (leases.py), a restart
carries on where the pass stopped, and two rounds that overlap move the cursor by compare-and-set, so the
worst they do is read a chunk twice. position is the last user id the pass has checked; updated_at is when
the pass began.
"""
import hashlib
from datetime import timedelta

from peewee import fn

from models import Cursor, User

CHUNK = 5000  # user ids one round reads at most: the most a round of a pass costs, whatever the shop's size
AGAIN_AFTER = timedelta(hours=1)  # a pass that reached the newest buyer starts again this long after it began
NAME_MAX = 32  # cursors.name is VARCHAR(32)


def cursor_name(kind, key):
    """Return the cursor's name for a pass of `kind` over `key` (a panel's name, a link): readable when it
    fits in cursors.name, else kind and a hash of the key."""
    name = f'{kind}:{key}'
    if len(name) <= NAME_MAX:
        return name
    return f'{kind}#{hashlib.sha256(key.encode()).hexdigest()}'[:NAME_MAX]


def next_range(name, now, chunk=CHUNK, again_after=AGAIN_AFTER):
    """Return (after, upto): the user ids after < id <= upto this round of the pass `name` must check (at most
    `chunk` of them), or None when the pass has reached the newest buyer and is not due to start again.

    A pass without a cursor row (a panel just added, a link base just set) begins at the first buyer.
    :param now: naive UTC; a pass begun more than `again_after` before (or after: a clock set back) is due again.
    """
    cursor = Cursor.get_or_none(Cursor.name == name)
    if cursor is None:
        Cursor.insert(name=name, position=0, updated_at=now).on_conflict_ignore().execute()
        cursor = Cursor.get(Cursor.name == name)
    newest = User.select(fn.MAX(User.id)).scalar() or 0
    position = cursor.position
    if position >= newest:
        if abs(now - cursor.updated_at) < again_after:
            return None
        restarted = (Cursor.update(position=0, updated_at=now)
                     .where(Cursor.name == name, Cursor.position == position).execute())
        if not restarted or newest == 0:
            return None  # another process moved it meanwhile: its round does the work
        position = 0
    start = User.select(fn.MIN(User.id)).where(User.id > position).scalar()  # ids may have gaps: skip them
    return position, min(start - 1 + chunk, newest)


def advance(name, after, reached):
    """Move the pass `name` from `after` (what next_range returned) to `reached`, the last id this round
    checked; a pass that another process moved meanwhile is left as it is."""
    (Cursor.update(position=reached)
     .where(Cursor.name == name, Cursor.position == after).execute())
