"""3x-ui's client fields: the typed `Client` body every write sends, and the bot's view of what a panel stores.

Both API generations decode a write body into the panel's Go struct `Client` with encoding/json, which refuses
a value of the wrong type; both store and return clients in shapes of their own (an inbound's settings entry
up to v3.0.x, a ClientRecord from v3.1). Times are panel milliseconds (0 = never), sizes plain bytes.
Source: 3x-ui's model.go at each tag (../shared/reference/xui-api.md).
"""
from datetime import datetime, timedelta, timezone

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# The fields of 3x-ui's `type Client` with their JSON types: every write body is decoded into that struct by
# Go's encoding/json, which refuses a value of the wrong type (e.g. the comma-separated string allowedIPs
# that a v3.4.2+ ClientRecord carries, where Client has []string). The union of v2.9.4 - v3.6.0 and the
# unreleased HEAD (resetDay, resetMax, trafficReset, trafficResetDay); a version ignores the keys it lacks.
# Source: model.go `type Client` at each tag (internal/database/model/model.go from v3.3.1).
CLIENT_FIELDS = {
    'id': str, 'security': str, 'password': str, 'flow': str, 'reverse': 'reverse', 'auth': str,
    'privateKey': str, 'publicKey': str, 'allowedIPs': list, 'preSharedKey': str, 'keepAlive': int,
    'secret': str, 'adTag': str, 'email': str, 'limitIp': int, 'totalGB': int, 'expiryTime': int,
    'enable': bool, 'tgId': int, 'subId': str, 'group': str, 'comment': str, 'reset': int,
    'resetDay': int, 'resetMax': int, 'trafficReset': str, 'trafficResetDay': int,
}
# Legacy panels store a settings entry as sent; their web page also keeps a shadowsocks client's `method` there
# (web/assets/js/model/inbound.js, Shadowsocks.toJson), which xray reads.
LEGACY_FIELDS = {**CLIENT_FIELDS, 'method': str}


def as_type(value, kind):
    """Convert one value read from the panel to the JSON type `kind` that Client has for it."""
    if kind is str:
        return value if isinstance(value, str) else ''
    if kind is bool:
        return value is True
    if kind is int:
        if isinstance(value, bool):
            return 0
        if isinstance(value, (int, float)):
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            return 0
    if kind is list:
        # ClientRecord joins Client's []string with commas (ToRecord); ToClient splits and trims them again
        parts = value if isinstance(value, list) else str(value or '').split(',')
        return [str(part).strip() for part in parts if isinstance(part, str) and part.strip()]
    # reverse: an object {"tag": ...} in Client; the record shows it as an object, null, or a raw string
    tag = value.get('tag') if isinstance(value, dict) else None
    return {'tag': tag} if isinstance(tag, str) and tag.strip() else None


def client_body(client, fields=CLIENT_FIELDS):
    """Build a write body from the panel's Client fields only, each converted to its Client type.

    What the panel sent is never echoed: keys not in `fields` are dropped, empty optional ones left out.
    """
    body = {}
    for key, kind in fields.items():
        if key in client:
            value = as_type(client[key], kind)
            if value is not None and value != []:
                body[key] = value
    return body


def record_to_client(record):
    """Turn a v3.1+ ClientRecord (int `id`, key in `uuid`) into a Client body, as the panel's ToClient does."""
    client = {key: value for key, value in record.items() if key not in ('id', 'uuid')}
    client['id'] = record.get('uuid') or ''
    return client_body(client)


def ms_to_datetime(ms):
    """Turn panel milliseconds into an aware UTC datetime; 0 means never (None)."""
    ms = int(ms or 0)
    if ms == 0:
        return None
    if ms < 0:
        # "delayed start": the clock starts at first use, so at least this much time is left
        return datetime.now(timezone.utc) + timedelta(milliseconds=-ms)
    return EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(moment):
    """Turn a datetime (None = never; naive means UTC, as stored) into panel milliseconds."""
    if moment is None:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - EPOCH) // timedelta(milliseconds=1)


def as_bytes(value):
    """Read a byte count: the panel's totalGB, total, up and down are all plain bytes; missing is 0."""
    return int(value or 0)


def as_tg_id(value):
    """Read a Telegram id, which old panels and the web UI store as a string or ''."""
    try:
        return int(value) or None
    except (TypeError, ValueError):
        return None


def client_view(client):
    """Describe a stored client (a settings entry: `id` is the UUID) in the bot's terms."""
    return {'email': client.get('email', ''),
            'uuid': client.get('id') or client.get('password') or client.get('auth') or '',
            'sub_id': client.get('subId') or '',
            'expiry': ms_to_datetime(client.get('expiryTime')),
            'enable': client.get('enable') is True,
            'total_bytes': as_bytes(client.get('totalGB')),
            'tg_id': as_tg_id(client.get('tgId'))}


def traffic_view(row):
    """Describe a traffic row in the bot's terms."""
    return {'up': as_bytes(row.get('up')), 'down': as_bytes(row.get('down')),
            'total': as_bytes(row.get('total')), 'expiry': ms_to_datetime(row.get('expiryTime')),
            'enable': row.get('enable') is True}
