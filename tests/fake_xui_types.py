"""3x-ui's Go types per panel version, and Go's encoding/json decoding into them, for the fake panel.

Sources (MHSanaei/3x-ui): `type Client`, `type ClientRecord`, `ClientReverse` and `Inbound` in
database/model/model.go (internal/database/model/model.go from v3.3.1), `ClientCreatePayload` in
web/service/client.go; Go's encoding/json (decode.go) for the decoding rules and the error texts:

- every body is decoded into the typed struct; a JSON value whose kind does not fit the field is an
  UnmarshalTypeError: `json: cannot unmarshal <kind> into Go struct field <Struct>.<path> of type <type>`,
  where Struct is the innermost struct and path the JSON field names from the root (Go 1.20+), or
  `json: cannot unmarshal <kind> into Go value of type <type>` for the top value. A number that is not an
  integer (or does not fit) going into an int names its literal: `number 1.5`. Decoding goes on after such
  an error and the first one is returned, so the other fields are still filled in;
- null leaves a field at its zero value; unknown keys are ignored; a key matches a field exactly or,
  failing that, case-insensitively;
- a syntax error rejects the whole body before anything is decoded.
"""
import json


def version_tuple(version):
    return tuple(int(part) for part in version.split('.'))


class Struct:
    """A Go struct: its type name as Go prints it (pkg.Name) and its JSON fields with their Go types.

    A field's type is 'string', 'int', 'int64', 'bool', ('slice', elem) or a Struct (decoded the same
    through a pointer; null leaves it nil, here None).
    """

    def __init__(self, go_name, fields):
        self.go_name = go_name
        self.name = go_name.rpartition('.')[2]
        self.fields = dict(fields)
        self.folded = {}
        for key in self.fields:
            self.folded.setdefault(key.lower(), key)

    def field(self, key):
        if key in self.fields:
            return key
        return self.folded.get(key.lower())

    def zero(self):
        return {key: zero(kind) for key, kind in self.fields.items()}


def type_name(kind):
    if isinstance(kind, Struct):
        return kind.go_name
    if isinstance(kind, tuple):
        return '[]' + type_name(kind[1])
    return kind


def zero(kind):
    if isinstance(kind, Struct):
        return None
    if isinstance(kind, tuple):
        return []
    return {'string': '', 'int': 0, 'int64': 0, 'bool': False}[kind]


class Number(float):
    """A JSON number that is not a plain integer, keeping its literal as Go's errors quote it."""

    def __new__(cls, literal):
        value = super().__new__(cls, literal)
        value.literal = literal
        return value


def json_kind(value):
    """Name a JSON value's kind the way Go's encoding/json errors do."""
    if isinstance(value, bool):
        return 'bool'
    if isinstance(value, (int, float)):
        return 'number'
    return {str: 'string', list: 'array', dict: 'object'}.get(type(value), 'null')


class _Decoder:
    def __init__(self):
        self.error = None

    def fail(self, kind_text, kind, context):
        if self.error is None:
            struct, path = context
            if struct:
                self.error = (f'json: cannot unmarshal {kind_text} into Go struct field {struct}.{".".join(path)} '
                              f'of type {type_name(kind)}')
            else:
                self.error = f'json: cannot unmarshal {kind_text} into Go value of type {type_name(kind)}'

    def value(self, data, kind, context):
        if data is None:
            return zero(kind)
        if isinstance(kind, Struct):
            if not isinstance(data, dict):
                self.fail(json_kind(data), kind, context)
                return None
            result = kind.zero()
            for key, item in data.items():
                name = kind.field(key)
                if name is None:
                    continue  # unknown keys are ignored
                path = context[1] + [name]
                result[name] = self.value(item, kind.fields[name], (kind.name, path))
            return result
        if isinstance(kind, tuple):
            if not isinstance(data, list):
                self.fail(json_kind(data), kind, context)
                return []
            return [self.value(item, kind[1], context) for item in data]
        if kind == 'string':
            if isinstance(data, str):
                return data
        elif kind == 'bool':
            if isinstance(data, bool):
                return data
        elif isinstance(data, (int, float)) and not isinstance(data, bool):
            if isinstance(data, int) and -2 ** 63 <= data < 2 ** 63:
                return data
            literal = data.literal if isinstance(data, Number) else str(data)
            self.fail(f'number {literal}', kind, context)
            return 0
        self.fail(json_kind(data), kind, context)
        return zero(kind)


def parse(body):
    """Parse a body as Go's json.Decoder reads its first value; return (data, syntax error or None)."""
    text = body.decode('utf-8', 'replace') if isinstance(body, bytes) else body
    stripped = text.lstrip(' \t\r\n')
    if not stripped:
        return None, 'EOF'

    def constant(name):
        raise ValueError(name)
    try:
        data, _ = json.JSONDecoder(parse_float=Number, parse_constant=constant).raw_decode(stripped)
    except ValueError as exc:
        position = getattr(exc, 'pos', 0) or 0
        if position >= len(stripped):
            return None, 'unexpected EOF'
        return None, f'invalid character {stripped[position]!r} looking for beginning of value'
    return data, None


def decode(data, kind):
    """Decode parsed JSON into a Go type; return (typed value, first error text or None)."""
    decoder = _Decoder()
    result = decoder.value(data, kind, ('', []))
    return result, decoder.error


def unmarshal(body, kind):
    """Parse and decode a body; return (typed value, error text or None)."""
    data, error = parse(body)
    if error:
        return None, error
    return decode(data, kind)


# 3x-ui's types

REVERSE = Struct('model.ClientReverse', {'tag': 'string'})


def client_struct(version):
    """Return `type Client` of this panel version (model.go): the struct every client body is decoded into."""
    v = version_tuple(version)
    fields = {'id': 'string', 'security': 'string', 'password': 'string', 'flow': 'string',
              'reverse': REVERSE, 'auth': 'string'}
    if v >= (3, 4, 2):
        fields.update(privateKey='string', publicKey='string', allowedIPs=('slice', 'string'),
                      preSharedKey='string', keepAlive='int')
    if v >= (3, 5, 0):
        fields.update(secret='string', adTag='string')
    fields.update(email='string', limitIp='int', totalGB='int64', expiryTime='int64', enable='bool',
                  tgId='int64', subId='string')
    if v >= (3, 2, 0):
        fields['group'] = 'string'
    fields.update(comment='string', reset='int', created_at='int64', updated_at='int64')
    return Struct('model.Client', fields)


def create_payload_struct(version):
    """Return `service.ClientCreatePayload` (POST clients/add): {client: Client, inboundIds: []int}."""
    return Struct('service.ClientCreatePayload', {'client': client_struct(version), 'inboundIds': ('slice', 'int')})


# POST login's LoginForm (web/controller/index.go)
LOGIN_FORM = Struct('controller.LoginForm', {'username': 'string', 'password': 'string', 'twoFactorCode': 'string'})

# the fields of model.Inbound a client call sends (the rest are ignored by a seller and typed alike)
INBOUND = Struct('model.Inbound', {'id': 'int', 'up': 'int64', 'down': 'int64', 'total': 'int64',
                                   'remark': 'string', 'enable': 'bool', 'expiryTime': 'int64', 'listen': 'string',
                                   'port': 'int', 'protocol': 'string', 'settings': 'string',
                                   'streamSettings': 'string', 'tag': 'string', 'sniffing': 'string'})


def record_fields(version):
    """Return the JSON keys of a ClientRecord as `get`/`list` send them, in their order, for this version.

    ClientRecord.MarshalJSON emits `reverse` (an object, or null when empty) after the other fields.
    """
    v = version_tuple(version)
    keys = ['id', 'email', 'subId', 'uuid', 'password', 'auth', 'flow', 'security']
    if v >= (3, 4, 2):
        keys += ['privateKey', 'publicKey', 'allowedIPs', 'preSharedKey', 'keepAlive']
    if v >= (3, 5, 0):
        keys += ['secret', 'adTag']
    keys += ['limitIp', 'totalGB', 'expiryTime', 'enable', 'tgId']
    if v >= (3, 2, 0):
        keys.append('group')
    return keys + ['comment', 'reset', 'createdAt', 'updatedAt', 'reverse']
