"""Loopback fake of the Telegram Bot API for end-to-end tests.

Serves ``/bot<token>/<method>`` on 127.0.0.1 the way api.telegram.org does:
parameters from the query string, a form, multipart or JSON; replies
``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code", "description"}``
with Telegram's own wording; real long polling for getUpdates. Point the bot
at it with ``TELEGRAM_API_URL=fake.url``.

    fake = FakeTelegram()
    alice = {"id": 1001, "first_name": "Alice", "username": "alice", "language_code": "en"}
    fake.send_text(alice, "/start")
    menu = fake.wait_for_message(1001, contains="Buy")
    fake.press(alice, menu, "buy")
    fake.close()

HTML is checked as Telegram parses it (tdlib's rules and error texts), and stricter in one
point the Bot API documents: a bare "&" is refused (``strict_html = False`` shows it, as
Telegram does). Lengths are the visible text's UTF-16 units. Groups: ``add_chat(id,
kind="supergroup")``, ``send_text(user, text, chat_id=id)``, ``post_as_bot(id, text, markup)``.

Payments in Telegram Stars (XTR): sendInvoice / createInvoiceLink, then ``pay(user, invoice)`` queues
the pre_checkout_query a paying user's app sends; an ok answer charges the user, records a StarTransaction
(getStarTransactions, chronological, paged by offset) and queues the successful_payment message
(``drop=True`` loses that update, as when the bot was down). ``renew(charge_id)`` makes a subscription's
next monthly charge. The Stars methods refuse as the Bot API server does (its own checks, from
github.com/tdlib/telegram-bot-api's Client.cpp, with its wording), then as Telegram's servers do (their
error names; where no source gives a name, the comment beside it says so).

Run it alone for benchmarks: ``python tests/fake_telegram.py --port 0 [--synthetic N]``
prints its URL, serves until SIGTERM, then prints a JSON summary; ``GET /_fake/stats``
returns the same summary while it runs.
"""

import argparse
import collections
import copy
import email.parser
import email.policy
import itertools
import json
import re
import secrets
import signal
import ssl
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import requests

DEFAULT_TOKEN = "123456789:fake-loopback-token"
DEFAULT_USERNAME = "spn_test_bot"

MAX_TEXT = 4096  # UTF-16 units after entity parsing, as Telegram counts them
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64  # bytes
MAX_CALLBACK_ANSWER = 200  # UTF-16 units
MAX_DESCRIPTION = 512  # setMyDescription
MAX_SHORT_DESCRIPTION = 120  # setMyShortDescription

MEMBER_STATUSES = ("creator", "administrator", "member", "restricted", "left", "kicked")
CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note", "upload_video_note",
}
BUTTON_ACTIONS = (
    "url", "callback_data", "web_app", "login_url", "switch_inline_query",
    "switch_inline_query_current_chat", "switch_inline_query_chosen_chat", "copy_text",
    "callback_game", "pay",
)
SEND_METHODS = {"sendMessage", "sendPhoto", "sendInvoice"}
STARS_SUBSCRIPTION_PERIOD = 2592000  # 30 days: the only period Telegram allows
MAX_STARS = 100000  # a generous ceiling for one Stars invoice (Telegram's exact one is not modelled)
PRE_CHECKOUT_TIMEOUT = 10  # seconds Telegram waits for answerPreCheckoutQuery

HTML_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic",
    "u": "underline", "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
    "del": "strikethrough", "tg-spoiler": "spoiler", "span": "spoiler", "a": "text_link",
    "code": "code", "pre": "pre", "blockquote": "blockquote", "tg-emoji": "custom_emoji",
}
NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
DEC_DIGITS = frozenset("0123456789")
TAG_NAME_RE = re.compile(r"[^\s>]*")
ATTR_RE = re.compile(r"""([^\s=>/"']+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]*))?""")
COMMAND_RE = re.compile(r"/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,32})?(?=\s|$)")
BOT_COMMAND_NAME_RE = re.compile(r"[a-z0-9_]{1,32}")
PATH_RE = re.compile(r"/bot([^/]*)/([^/]*)")
WEBHOOK_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")

NOT_MODIFIED = (
    "message is not modified: specified new message content and reply markup are exactly "
    "the same as a current content and reply markup of the message"
)
QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"
ANSWER_LIMIT = 15.0  # seconds; see FakeTelegram.answer_limit


class TelegramError(Exception):
    """An error reply of the Bot API: HTTP status, description and optional parameters."""

    def __init__(self, code, description, parameters=None):
        super().__init__(f"{code} {description}")
        self.code = code
        self.description = description
        self.parameters = parameters

    def body(self):
        """Return the JSON envelope Telegram sends for this error."""
        body = {"ok": False, "error_code": self.code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def bad_request(detail):
    """Return a 400 error worded like the Bot API's."""
    return TelegramError(400, "Bad Request: " + detail)


@dataclass
class Call:
    """One request the bot made: canonical method name, parameters, uploads and outcome."""

    method: str
    params: dict
    files: dict
    time: float
    status: int = 200
    result: object = None
    description: str = None

    @property
    def ok(self):
        return self.status == 200

    def __repr__(self):
        shown = {k: v for k, v in self.params.items() if k != "reply_markup"}
        outcome = "ok" if self.ok else f"{self.status} {self.description}"
        return f"<{self.method} {json.dumps(shown, ensure_ascii=False)[:200]} -> {outcome}>"


@dataclass
class _Chat:
    info: dict
    next_id: int = 0
    messages: dict = field(default_factory=dict)  # message_id -> current Message
    bot_ids: list = field(default_factory=list)  # ids of the bot's messages, in order
    members: dict = field(default_factory=dict)  # user_id -> (status, is_member)
    members_visible: bool = True


def utf16_len(text):
    """Return the length of text in UTF-16 code units, the unit of Telegram's offsets."""
    return len(text.encode("utf-16-le")) // 2


def decode_entity(text, pos):
    """Decode the HTML entity at text[pos] ('&') as Telegram's parser does; return (char, end) or (None, pos).

    As in tdlib's decode_html_entity: named &lt; &gt; &amp; &quot; and numeric references, the ';' optional,
    numeric ones below U+10FFFF and shorter than 10 characters.
    """
    end = pos + 1
    if text.startswith("#", end):
        end += 1
        hexadecimal = text.startswith("x", end)
        end += hexadecimal
        digits = HEX_DIGITS if hexadecimal else DEC_DIGITS
        start = end
        while end < len(text) and text[end] in digits:
            end += 1
        code = int(text[start:end], 16 if hexadecimal else 10) if end > start else 0
        if code == 0 or code >= 0x10FFFF or end - pos >= 10:
            return None, pos
        char = chr(code)
    else:
        while end < len(text) and text[end].isascii() and text[end].isalpha():
            end += 1
        char = NAMED_ENTITIES.get(text[pos + 1 : end])
        if char is None:
            return None, pos
    return char, end + 1 if text.startswith(";", end) else end


def _decode_attribute(value):
    out, pos = [], 0
    while pos < len(value):
        char, end = decode_entity(value, pos) if value[pos] == "&" else (None, pos)
        out.append(char if char is not None else value[pos])
        pos = end if char is not None else pos + 1
    return "".join(out)


def _entity(tag, attrs, offset, length):
    entity = {"offset": offset, "length": length, "type": HTML_TAGS[tag]}
    if tag == "a":
        if not attrs.get("href"):
            return None  # Telegram drops links without a usable URL and keeps the text
        entity["url"] = attrs["href"]
    elif tag == "code" and attrs.get("class", "").startswith("language-"):
        entity["language"] = attrs["class"][len("language-"):]
    elif tag == "blockquote" and "expandable" in attrs:
        entity["type"] = "expandable_blockquote"
    elif tag == "tg-emoji":
        if not attrs.get("emoji-id", "").isdigit():
            raise bad_request("can't parse entities: Invalid custom emoji identifier specified")
        entity["custom_emoji_id"] = attrs["emoji-id"]
    return entity


def _strip(text, entities):
    """Trim surrounding whitespace the way Telegram does, keeping entities on their characters."""
    stripped = text.strip()
    lead = utf16_len(text[: len(text) - len(text.lstrip())])
    end = utf16_len(stripped)
    kept = []
    for entity in entities:
        start = max(entity["offset"] - lead, 0)
        stop = min(entity["offset"] + entity["length"] - lead, end)
        if stop > start:
            kept.append({**entity, "offset": start, "length": stop - start})
    return stripped, kept


def parse_html(text, strict=True):
    """Split Telegram HTML into (plain text, entities); raise 400 where Telegram would.

    With strict (the default), an "&" that does not start a complete entity is refused too: the Bot API's
    rules say it must be written &amp; (Telegram itself, like tdlib's parser, shows it as it is).
    """
    plain, entities, stack = [], [], []
    pos = emitted = 0

    def fail(detail):
        return bad_request("can't parse entities: " + detail)

    def at(index):
        return f"at byte offset {len(text[:index].encode())}"

    while pos < len(text):
        char = text[pos]
        if char == "&":
            decoded, end = decode_entity(text, pos)
            if strict and (decoded is None or text[end - 1] != ";"):
                raise fail(f'Character "&" must be escaped as "&amp;" {at(pos)}')
            if decoded is not None:
                plain.append(decoded)
                emitted += utf16_len(decoded)
                pos = end
                continue
        if char != "<":
            plain.append(char)
            emitted += utf16_len(char)
            pos += 1
            continue
        start = pos
        if text.startswith("</", pos):
            if not stack:
                raise fail(f"Unexpected end tag {at(start)}")
            end = text.find(">", pos)
            if end < 0:
                raise fail(f"Unclosed end tag {at(start)}")
            name = text[pos + 2 : end].strip().lower()
            tag, attrs, begin = stack.pop()
            if name and name != tag:
                raise fail(f'Unmatched end tag {at(start)}, expected "</{tag}>", found "</{name}>"')
            if emitted > begin:
                entity = _entity(tag, attrs, begin, emitted - begin)
                last = entities[-1] if entities else None
                if (tag == "pre" and last and last["type"] == "code"
                        and (last["offset"], last["length"]) == (begin, emitted - begin)):
                    entity["language"] = entities.pop().get("language")
                if entity:
                    entities.append(entity)
            pos = end + 1
            continue
        name_end = TAG_NAME_RE.match(text, pos + 1).end()
        if name_end >= len(text):
            raise fail(f"Unclosed start tag {at(start)}")
        tag = text[pos + 1 : name_end].lower()
        if tag not in HTML_TAGS:
            raise fail(f'Unsupported start tag "{tag}" {at(start)}')
        attrs, pos = {}, name_end
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                raise fail(f"Unclosed start tag {at(start)}")
            if text[pos] == ">":
                break
            match = ATTR_RE.match(text, pos)
            if not match:
                raise fail(f'Empty attribute name in the tag "{tag}" {at(start)}')
            value = match.group(2) or ""
            value = value[1:-1] if value[:1] in ("\"", "'") else value
            attrs[match.group(1).lower()] = _decode_attribute(value)
            pos = match.end()
        if tag == "span" and attrs.get("class") != "tg-spoiler":
            raise fail(f'Tag "span" must have class "tg-spoiler" {at(start)}')
        stack.append((tag, attrs, emitted))
        pos += 1
    if stack:
        raise fail(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    for entity in entities:
        if entity["type"] == "code":
            entity.pop("language", None)
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return _strip("".join(plain), entities)


def _formatted(text, parse_mode, strict=True):
    """Return (visible text, entities) for text sent with parse_mode."""
    if not parse_mode:
        return _strip(text, [])
    if parse_mode.lower() == "html":
        return parse_html(text, strict)
    if parse_mode.lower() in ("markdown", "markdownv2"):
        return _strip(text, [])  # not modelled: stored verbatim
    raise bad_request("unsupported parse_mode")


def _image_size(data):
    """Return (width, height) of a PNG or JPEG image, or None when it is neither."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 9 <= len(data) and data[pos] == 0xFF:
            marker, size = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return width, height
            pos += 2 + size
    return None


def _as_user(user):
    """Return a Telegram User dict from a dict, an object with attributes or a bare id."""
    if isinstance(user, int):
        user = {"id": user}
    get = user.get if isinstance(user, dict) else lambda name: getattr(user, name, None)
    result = {"id": int(get("id")), "is_bot": False, "first_name": get("first_name") or "User"}
    for name in ("last_name", "username", "language_code"):
        if get(name):
            result[name] = get(name)
    return result


def _text_of(message):
    return message.get("text") or message.get("caption") or ""


def _decode_json(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _read_params(query, content_type, body):
    """Merge query-string and body parameters; return (params, files) as Telegram reads them."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    files = {}
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    elif kind == "application/json" and body:
        try:
            decoded = json.loads(body)
        except ValueError as exc:
            raise bad_request("can't parse JSON object") from exc
        if isinstance(decoded, dict):
            params.update(decoded)
    elif kind == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files[name] = payload
            else:
                params[name] = payload.decode("utf-8")
    return params, files


def throwaway_tls(directory, host="127.0.0.1"):
    """Make a CA and a server certificate for host signed by it, in directory (valid one day).

    Returns (server ssl.SSLContext, path of the CA's PEM): serve with FakeTelegram(tls=context)
    and let the client trust the CA (SSL_CERT_FILE=path). Needs the cryptography package.
    """
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca, extensions=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Throwaway test CA")])
    ca_cert = build(ca_name, ca_name, ca_key.public_key(), ca_key, True, [
        (x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), ca_name, key.public_key(), ca_key,
                 False, [(x509.SubjectAlternativeName([san]), False),
                         (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
                         (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, ca_path


def _flag(params, name):
    """A boolean argument as the Bot API reads it (Client::to_bool): true, yes or 1, any case; else false."""
    return str(params.get(name, "")).strip().lower() in ("true", "yes", "1")


def _required(params, name):
    """A required string argument, refused as the Bot API does (Client::get_required_string_arg)."""
    value = str(params.get(name, ""))
    if not value:
        # "Parameter ... is required", its first letter lowered by Client::fail_query_with_error
        raise bad_request(f'parameter "{name}" is required')
    return value


def _user_id(params):
    """user_id as the Bot API reads it (Client::get_user_id): a positive integer, else 400 before Telegram sees it."""
    user_id = _td_integer(params.get("user_id"))
    if user_id <= 0:
        raise bad_request("invalid user_id specified")
    return user_id


def _td_integer(value, default=0):
    """An integer argument as td::to_integer reads it: leading digits after an optional '-', garbage is 0."""
    match = re.match(r"\s*(-?)([0-9]+)", str(value or ""))
    if value in (None, ""):
        return default
    return int(match[1] + match[2]) if match else 0


QUERY_ID_INVALID = ("query is too old and response timeout expired or query ID is invalid")  # the Bot API's words


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' pooled session expects
    wbufsize = -1  # one write per response: split header/body writes stall on delayed ACKs
    disable_nagle_algorithm = True
    server_version = "nginx"
    sys_version = ""

    def do_GET(self):
        self.server.fake._serve(self)

    do_POST = do_GET

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    # a loaded machine may not run the accept loop for a while: queue a burst of connections
    # instead of dropping SYNs past socketserver's default of 5 (a 1 s retransmission each)
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # a killed bot's reset is no news, nor a client refusing our throwaway certificate
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)


class FakeTelegram:
    """A loopback Bot API server plus helpers that act as Telegram users and observe the bot."""

    def __init__(self, token=DEFAULT_TOKEN, username=DEFAULT_USERNAME, first_name="SPN Test Bot",
                 port=0, clock=time.time, record=True, history=None, tls=None, local=True):
        self.token = token
        self.bot_user = {"id": int(token.split(":")[0]), "is_bot": True,
                         "first_name": first_name, "username": username}
        self.latency = 0.0
        self.strict_html = True  # refuse a bare "&" in HTML, as the Bot API's rules say (Telegram shows it)
        self.max_sends_per_second = None  # Telegram's ~30 messages/s flood limit, off by default
        # Telegram refuses to answer a callback query this many seconds after the press (users report
        # about 15-20 s; undocumented): the lower end, so a bot that passes here passes there
        self.answer_limit = ANSWER_LIMIT
        self.sent = []
        self.callback_answers = []
        self.counts = collections.Counter()
        self.commands = {}  # (scope JSON, language_code) -> list of BotCommand dicts
        self.descriptions = {}  # ("description" or "short_description", language_code) -> text
        self.webhook_url = ""
        self.webhook_secret = ""
        self.webhook_error = ""  # getWebhookInfo's last_error_message
        self.webhook_delivered = 0
        self.webhook_failures = 0
        self.webhook_senders = 8  # parallel deliveries at most (Telegram: max_connections, default 40)
        self.webhook_retry_seconds = 0.2  # Telegram waits longer; tests should not
        self.local = local  # a self-hosted Bot API server (--local) accepts http:// webhooks
        self.synthetic = None  # (batch, users, text, total) for benchmarks
        self.synthetic_made = 0
        self.confirmed = 0  # updates the bot confirmed through getUpdates' offset
        self._clock = clock
        self._record = record
        self._history = history
        self._cond = threading.Condition()
        self._chats = {}
        self._users = {}
        self._blocked = set()
        self._updates = collections.deque()
        self._update_ids = itertools.count(700000000)
        self._query_ids = itertools.count(4200000000000000001)
        self._queries = {}  # callback query id -> {"update_id", "answered"}
        self._answers_by_update = {}
        self._files = {}
        self._file_ids = itertools.count(1)
        self._allowed_updates = None
        self._webhook_generation = 0
        self._in_flight = set()  # update ids being POSTed to the webhook
        self._poll_generation = 0
        self._polling = 0
        self._limits = []
        self._breaks = []  # transport faults from break_next
        self._recent_sends = collections.deque()
        self._cursors = collections.defaultdict(int)
        self._closing = False
        self.invoice_links = {}  # link -> invoice (createInvoiceLink)
        self._invoices = {}  # (chat id, message id) -> invoice (sendInvoice)
        self.pre_checkouts = {}  # query id -> {"update_id", "user", "invoice", "answer", "drop", ...}
        self.charges = {}  # telegram_payment_charge_id -> {"user", "invoice", "refunded", "canceled", ...}
        self.star_transactions = []  # StarTransaction dicts in chronological order
        self._methods = {
            "getMe": self._get_me, "getUpdates": self._get_updates,
            "deleteWebhook": self._delete_webhook, "setWebhook": self._set_webhook,
            "getWebhookInfo": self._get_webhook_info, "sendMessage": self._send_message,
            "sendPhoto": self._send_photo, "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message, "answerCallbackQuery": self._answer_callback_query,
            "getChat": self._get_chat, "getChatMember": self._get_chat_member,
            "sendChatAction": self._send_chat_action, "setMyCommands": self._set_my_commands,
            "getMyCommands": self._get_my_commands, "deleteMyCommands": self._delete_my_commands,
            "setMyDescription": self._set_my_description, "getMyDescription": self._get_my_description,
            "setMyShortDescription": self._set_my_short_description,
            "getMyShortDescription": self._get_my_short_description,
            "sendInvoice": self._send_invoice, "createInvoiceLink": self._create_invoice_link,
            "answerPreCheckoutQuery": self._answer_pre_checkout_query,
            "getStarTransactions": self._get_star_transactions, "refundStarPayment": self._refund_star_payment,
            "editUserStarSubscription": self._edit_user_star_subscription,
        }
        self._canonical = {name.lower(): name for name in self._methods}
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.fake = self
        scheme = "http"
        if tls is not None:  # an ssl.SSLContext (see throwaway_tls); the handshake runs in the request's thread
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        # a short poll interval keeps close() (and so each test's teardown) fast
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="fake-telegram")
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Release pending long polls and stop the server."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- knobs ---------------------------------------------------------------

    def rate_limit_next(self, n, retry_after=1, method="sendMessage"):
        """Answer the next n calls of method (any method if None) with 429 Too Many Requests."""
        with self._cond:
            self._limits.append({"method": method, "left": n, "retry_after": retry_after})

    def break_next(self, n, kind, method=None, seconds=5.0):
        """Make the next n calls of method (any method if None) fail below the API, as a network does.

        kind: "drop" closes the connection unanswered (the client sees a ConnectionError), "hang"
        holds the call for `seconds` before serving it (a read timeout), "bad_gateway" answers
        502 with nginx's HTML page, as Telegram's front end does while the API is down.
        """
        if kind not in ("drop", "hang", "bad_gateway"):
            raise ValueError(kind)
        with self._cond:
            self._breaks.append({"method": method, "left": n, "kind": kind, "seconds": seconds})

    def _take_break(self, method):
        with self._cond:
            for fault in self._breaks:
                if fault["left"] > 0 and fault["method"] in (None, method):
                    fault["left"] -= 1
                    return fault
        return None

    def block_user(self, chat_id, announce=True):
        """Make the user block the bot: sends to that chat get 403, as after a real block."""
        with self._cond:
            self._blocked.add(int(chat_id))
            if announce:
                self._announce_membership(int(chat_id), "member", "kicked")

    def unblock_user(self, chat_id, announce=True):
        """Make the user unblock the bot again."""
        with self._cond:
            self._blocked.discard(int(chat_id))
            if announce:
                self._announce_membership(int(chat_id), "kicked", "member")

    def add_user(self, user):
        """Register a user who has opened the bot before, so the bot may message them."""
        with self._cond:
            return self._private_chat(_as_user(user)).info["id"]

    def add_chat(self, chat_id, kind="channel", title="SPN Channel", username=None,
                 members_visible=True):
        """Create a group or channel; members_visible=False makes getChatMember fail as for a non-admin bot."""
        info = {"id": int(chat_id), "title": title, "type": kind}
        if username:
            info["username"] = username.lstrip("@")
        with self._cond:
            self._chats[int(chat_id)] = _Chat(info=info, members_visible=members_visible)

    def set_member(self, chat_id, user_id, status="member", is_member=None):
        """Set what getChatMember(chat_id, user_id) reports; is_member applies to 'restricted'."""
        if status not in MEMBER_STATUSES:
            raise ValueError(f"status must be one of {MEMBER_STATUSES}")
        with self._cond:
            self._chats[int(chat_id)].members[int(user_id)] = (status, is_member)

    # -- acting as users -----------------------------------------------------

    def send_text(self, user, text, chat_id=None):
        """Queue a text message from user, as the Telegram app sends it; return the update id.

        The message goes to the user's private chat with the bot, or to the group chat_id (see add_chat).
        """
        with self._cond:
            sender = _as_user(user)
            if chat_id is not None:
                self._users[sender["id"]] = sender
                chat = self._chats[int(chat_id)]
                if chat.info["type"] not in ("group", "supergroup"):
                    raise ValueError(f"chat {chat_id} is a {chat.info['type']}, not a group")
            else:
                chat = self._private_chat(sender)
            if chat_id is None and sender["id"] in self._blocked:
                # writing to a blocked bot means pressing Restart, which unblocks it first
                self._blocked.discard(sender["id"])
                self._announce_membership(sender["id"], "kicked", "member")
            message = self._new_message(chat, sender, text=text)
            command = COMMAND_RE.match(text)
            if command:
                message["entities"] = [{"offset": 0, "length": utf16_len(command.group()),
                                        "type": "bot_command"}]
            return self._queue({"message": message})

    def post_as_bot(self, chat_id, text, reply_markup=None):
        """Put a message from the bot into chat_id (e.g. one left from before) and return it."""
        with self._cond:
            content = {"text": text}
            if reply_markup:
                content["reply_markup"] = _decode_json(reply_markup)
            return copy.deepcopy(self._new_message(self._chats[int(chat_id)], self.bot_user, **content))

    def press(self, user, message, callback_data, strict=True):
        """Queue a press of an inline button under message; return the update id.

        With strict, callback_data must be on the message's current keyboard, as a real user
        can only press what is shown.
        """
        with self._cond:
            chat = self._chats.get(message["chat"]["id"])
            current = chat and chat.messages.get(message["message_id"])
            if current is None:
                raise ValueError(f"no message {message['message_id']} in chat {message['chat']['id']}")
            if strict and callback_data not in [data for _, data in self.buttons(current)]:
                raise ValueError(f"{callback_data!r} is not on the keyboard: {self.buttons(current)}")
            query_id = str(next(self._query_ids))
            update_id = self._queue({"callback_query": {
                "id": query_id, "from": _as_user(user), "message": copy.deepcopy(current),
                "chat_instance": str(-(chat.info["id"] * 7919 % 10**18)), "data": callback_data,
            }})
            self._queries[query_id] = {"update_id": update_id, "answered": False, "pressed": self._clock()}
            return update_id

    def inject(self, update):
        """Queue any Update body (without update_id), e.g. {"edited_message": ...}; return its id."""
        with self._cond:
            return self._queue(copy.deepcopy(update))

    def pay(self, user, invoice, drop=False, payload=None, total_amount=None):
        """Press Pay on an invoice (a message with an invoice, or an invoice link): queue the pre_checkout_query.

        Once the bot answers ok, the user is charged and the successful_payment message is queued (not with
        drop, as when the update never reaches the bot). payload and total_amount forge the query's fields,
        as a modified client could. Return the query id.
        """
        with self._cond:
            if isinstance(invoice, str):
                details = self.invoice_links[invoice]
            else:
                details = self._invoices[(invoice["chat"]["id"], invoice["message_id"])]
            details = {**details}
            if payload is not None:
                details["payload"] = payload
            if total_amount is not None:
                details["total_amount"] = total_amount
            sender = _as_user(user)
            self._private_chat(sender)
            query_id = str(next(self._query_ids))
            update_id = self._queue({"pre_checkout_query": {
                "id": query_id, "from": sender, "currency": details["currency"],
                "total_amount": details["total_amount"], "invoice_payload": details["payload"]}})
            self.pre_checkouts[query_id] = {"update_id": update_id, "user": sender, "invoice": details,
                                            "answer": None, "drop": drop, "asked": time.monotonic()}
            return query_id

    def wait_for_pre_checkout(self, query_id, timeout=10):
        """Return the bot's answer to a pre-checkout query: {"ok", "error_message", "seconds", "charge_id"}."""
        return self._wait(lambda: self.pre_checkouts[query_id]["answer"], timeout,
                          f"pre-checkout query {query_id} was never answered")

    def renew(self, charge_id, drop=False):
        """Charge a subscription's next period (Telegram does it by itself); return the new charge id."""
        with self._cond:
            root = self.charges[charge_id]["root"]
            first = self.charges[root]
            if first["canceled"]:
                raise ValueError("the subscription was canceled: Telegram would not renew it")
            return self._charge(first["user"], first["invoice"], drop, root=root)

    # -- observing the bot ---------------------------------------------------

    def messages_to(self, chat_id):
        """Return the bot's messages in chat_id, oldest first, as they look now."""
        with self._cond:
            chat = self._chats.get(int(chat_id))
            if chat is None:
                return []
            return [copy.deepcopy(chat.messages[i]) for i in chat.bot_ids if i in chat.messages]

    def get_message(self, chat_id, message_id):
        """Return message_id in chat_id as it looks now (after edits), or None if gone."""
        with self._cond:
            chat = self._chats.get(int(chat_id))
            message = chat and chat.messages.get(int(message_id))
            return copy.deepcopy(message) if message else None

    def file_bytes(self, file_id):
        """Return the bytes uploaded under file_id (e.g. a sent photo)."""
        return self._files[file_id]

    @staticmethod
    def buttons(message):
        """Return the inline buttons of message as (text, callback_data or url) pairs."""
        rows = (message.get("reply_markup") or {}).get("inline_keyboard", [])
        return [(b["text"], b.get("callback_data", b.get("url"))) for row in rows for b in row]

    def wait_for(self, predicate, timeout=10):
        """Return the first recorded call satisfying predicate, waiting up to timeout seconds."""
        return self._wait(lambda: next((c for c in self.sent if predicate(c)), None), timeout,
                          "no call matched the predicate")

    def wait_for_message(self, chat_id, contains=None, timeout=10):
        """Return the bot's next unread message in chat_id (containing `contains` if given)."""
        chat_id = int(chat_id)

        def find():
            chat = self._chats.get(chat_id)
            if chat is None:
                return None
            for index in range(self._cursors[chat_id], len(chat.bot_ids)):
                message = chat.messages.get(chat.bot_ids[index])
                if message and (contains is None or contains in _text_of(message)):
                    self._cursors[chat_id] = index + 1
                    return copy.deepcopy(message)
            return None

        wanted = f"a new message to {chat_id}" + (f" containing {contains!r}" if contains else "")
        return self._wait(find, timeout, f"no {wanted}")

    def wait_for_answer(self, update_id, timeout=10):
        """Return the answerCallbackQuery record for the press that made update_id."""
        return self._wait(lambda: self._answers_by_update.get(update_id), timeout,
                          f"callback query of update {update_id} was never answered")

    def wait_polling(self, timeout=10):
        """Wait until the bot is holding a long poll (it is up and reading updates)."""
        self._wait(lambda: self._polling or None, timeout, "the bot never long-polled")

    def wait_webhook(self, timeout=10):
        """Wait until the bot has set a webhook (it is up and taking updates by webhook); return its URL."""
        return self._wait(lambda: self.webhook_url or None, timeout, "the bot never set a webhook")

    def stats(self):
        """Return call counts per method and update totals (also served at /_fake/stats)."""
        with self._cond:
            return {"calls": dict(self.counts), "synthetic_updates": self.synthetic_made,
                    "confirmed_updates": self.confirmed, "pending_updates": len(self._updates),
                    "webhook_delivered": self.webhook_delivered, "webhook_failures": self.webhook_failures}

    def pending_updates(self):
        """Return how many updates the bot has not confirmed yet."""
        with self._cond:
            return len(self._updates)

    # -- internals: state ----------------------------------------------------

    def _wait(self, find, timeout, failure):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = find()
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{failure} within {timeout}s\n{self._dump()}")
                self._cond.wait(remaining)

    def _dump(self):
        lines = [f"last calls ({len(self.sent)} in all):"] + [f"  {c!r}" for c in self.sent[-15:]]
        lines.append(f"unconfirmed updates: {len(self._updates)}; bot long-polling now: {self._polling}")
        return "\n".join(lines)

    def _now(self):
        return int(self._clock())

    def _private_chat(self, user):
        self._users[user["id"]] = user
        chat = self._chats.get(user["id"])
        if chat is None:
            info = {"id": user["id"], "first_name": user["first_name"], "type": "private"}
            info.update({k: user[k] for k in ("last_name", "username") if k in user})
            chat = self._chats[user["id"]] = _Chat(info=info)
        return chat

    def _new_message(self, chat, sender, **content):
        chat.next_id += 1
        message = {"message_id": chat.next_id, "from": sender, "chat": chat.info,
                   "date": self._now(), **content}
        chat.messages[chat.next_id] = message
        if sender["is_bot"]:
            chat.bot_ids.append(chat.next_id)
        if self._history and len(chat.messages) > self._history:
            chat.messages.pop(next(iter(chat.messages)))
            del chat.bot_ids[: -self._history]
        return message

    def _queue(self, update):
        update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        self._cond.notify_all()
        return update["update_id"]

    def _announce_membership(self, chat_id, old, new):
        chat = self._chats.get(chat_id)
        if chat is None or chat.info["type"] != "private":
            return
        self._queue({"my_chat_member": {
            "chat": chat.info, "from": self._users[chat_id], "date": self._now(),
            "old_chat_member": {"user": self.bot_user, "status": old},
            "new_chat_member": {"user": self.bot_user, "status": new, **({"until_date": 0} if new == "kicked" else {})},
        }})

    def _chat(self, params):
        raw = str(params.get("chat_id", "")).strip()
        if not raw:
            raise bad_request("chat_id is empty")
        if raw.startswith("@"):
            for chat in self._chats.values():
                if chat.info.get("username", "").lower() == raw[1:].lower():
                    return chat
        elif re.fullmatch(r"-?\d+", raw) and int(raw) in self._chats:
            return self._chats[int(raw)]
        raise bad_request("chat not found")

    def _writable_chat(self, params):
        chat = self._chat(params)
        if chat.info["id"] in self._blocked:
            raise TelegramError(403, "Forbidden: bot was blocked by the user")
        return chat

    def _bot_message(self, params, verb="edit"):
        chat = self._chat(params)
        raw = str(params.get("message_id", "")).strip()
        if not raw:
            raise bad_request("message identifier is not specified")
        message = chat.messages.get(int(raw)) if raw.isdigit() else None
        if message is None:
            raise bad_request(f"message to {verb} not found")
        return chat, message

    @staticmethod
    def _markup(params, inline_only=False):
        """Return the parsed reply_markup, validated as Telegram validates keyboards."""
        raw = params.get("reply_markup")
        if raw in (None, ""):
            return None
        markup = _decode_json(raw)
        if not isinstance(markup, dict):
            raise bad_request("can't parse reply keyboard markup JSON object")
        rows = markup.get("inline_keyboard")
        if rows is None:
            if inline_only or not {"keyboard", "remove_keyboard", "force_reply"} & markup.keys():
                raise bad_request("inline keyboard expected" if inline_only
                                  else "can't parse reply keyboard markup JSON object")
            return markup
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise bad_request("can't parse inline keyboard markup JSON object")
        for button in (button for row in rows for button in row):
            if not isinstance(button, dict) or not isinstance(button.get("text"), str):
                raise bad_request("can't parse inline keyboard button: Field \"text\" must be of type String")
            if not any(action in button for action in BUTTON_ACTIONS):
                raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
            if "callback_data" in button and not 1 <= len(str(button["callback_data"]).encode()) <= MAX_CALLBACK_DATA:
                raise bad_request("BUTTON_DATA_INVALID")
            if "url" in button and not str(button["url"]).strip():
                raise bad_request("BUTTON_URL_INVALID")
        return markup

    # -- internals: HTTP -----------------------------------------------------

    def _serve(self, handler):
        if self._closing:
            handler.close_connection = True  # behave like a server that has gone away
            return
        url = urlsplit(handler.path)
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        match = PATH_RE.fullmatch(url.path)
        fault = self._take_break(self._canonical.get(match[2].lower(), match[2])) if match else None
        if fault and fault["kind"] == "drop":
            handler.close_connection = True
            return
        if fault and fault["kind"] == "hang":
            with self._cond:
                self._cond.wait_for(lambda: self._closing, timeout=fault["seconds"])
        if fault and fault["kind"] == "bad_gateway":
            page = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n" \
                   b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
            handler.send_response(502)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(page)))
            handler.end_headers()
            handler.wfile.write(page)
            return
        try:
            if url.path == "/_fake/stats":
                status, payload = 200, self.stats()
            elif not match:
                raise TelegramError(404, "Not Found")
            else:
                params, files = _read_params(url.query, handler.headers.get("Content-Type", ""), body)
                status, payload = 200, {"ok": True, "result": self._call(match[1], match[2], params, files)}
        except TelegramError as exc:
            status, payload = exc.code, exc.body()
        except Exception:  # a bug in the fake: say so loudly instead of dropping the connection
            traceback.print_exc()
            status, payload = 500, {"ok": False, "error_code": 500, "description": "Internal Server Error"}
        data = json.dumps(payload, ensure_ascii=False).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (e.g. a killed bot's abandoned long poll)
        handler.close_connection = handler.close_connection or self._closing

    def _call(self, token, name, params, files):
        if self.latency:
            time.sleep(self.latency)
        method = self._canonical.get(name.lower(), name)
        with self._cond:
            self.counts[method] += 1
            try:
                if token != self.token:
                    raise TelegramError(401, "Unauthorized")
                if method not in self._methods:
                    raise TelegramError(404, "Not Found")
                self._throttle(method)
                result = self._methods[method](params, files)
            except TelegramError as exc:
                self._log(method, params, files, exc.code, None, exc.description)
                raise
            self._log(method, params, files, 200, result, None)
            return copy.deepcopy(result)

    def _log(self, method, params, files, status, result, description):
        if method == "getUpdates" or not self._record:
            return
        shown = {k: _decode_json(v) if k in ("reply_markup", "commands", "scope", "entities") else v
                 for k, v in params.items()}
        self.sent.append(Call(method, shown, files, self._clock(), status,
                              copy.deepcopy(result), description))
        self._cond.notify_all()

    def _throttle(self, method):
        for limit in self._limits:
            if limit["left"] > 0 and limit["method"] in (None, method):
                limit["left"] -= 1
                raise self._too_many(limit["retry_after"])
        if self.max_sends_per_second and method in SEND_METHODS:
            now = time.monotonic()
            while self._recent_sends and now - self._recent_sends[0] >= 1:
                self._recent_sends.popleft()
            if len(self._recent_sends) >= self.max_sends_per_second:
                raise self._too_many(1)
            self._recent_sends.append(now)

    @staticmethod
    def _too_many(retry_after):
        return TelegramError(429, f"Too Many Requests: retry after {retry_after}",
                             {"retry_after": retry_after})

    def _charge(self, user, invoice, drop, root=None):
        charge_id = "stx" + secrets.token_urlsafe(48)
        now = self._now()
        payment = {"currency": invoice["currency"], "total_amount": invoice["total_amount"],
                   "invoice_payload": invoice["payload"], "telegram_payment_charge_id": charge_id,
                   "provider_payment_charge_id": ""}
        period = invoice.get("subscription_period")
        if period:
            payment.update({"subscription_expiration_date": now + period, "is_recurring": True})
            if root is None:
                payment["is_first_recurring"] = True
        self.charges[charge_id] = {"user": user, "invoice": invoice, "refunded": False, "canceled": False,
                                   "amount": invoice["total_amount"], "root": root or charge_id}
        source = {"type": "user", "transaction_type": "invoice_payment", "user": user,
                  "invoice_payload": invoice["payload"]}
        if period:
            source["subscription_period"] = period
        self.star_transactions.append({"id": charge_id, "amount": invoice["total_amount"], "date": now,
                                       "source": source})
        if not drop:
            chat = self._private_chat(user)
            message = self._new_message(chat, user, successful_payment=payment)
            self._queue({"message": message})
        self._cond.notify_all()
        return charge_id

    def _invoice_params(self, params):
        """Check an invoice as the Bot API (Client::get_input_message_invoice) and then Telegram do for Stars.

        The Bot API's checks and words come first; the rest are Telegram's server errors, named as the MTProto
        method pages list them for messages.sendMedia / payments.exportInvoice where they do; TITLE_INVALID,
        DESCRIPTION_INVALID, CURRENCY_INVALID and PROVIDER_TOKEN_INVALID for these cases are in no source found.
        """
        title, description = _required(params, "title"), _required(params, "description")
        payload = _required(params, "payload")
        currency, prices = _required(params, "currency"), _required(params, "prices")
        try:
            prices = json.loads(prices)
        except ValueError:
            raise bad_request("can't parse prices JSON object") from None
        if not isinstance(prices, list):
            raise bad_request("expected an Array of labeled prices")
        for price in prices:  # Client::get_labeled_price_part
            if not isinstance(price, dict):
                raise bad_request("can't parse labeled price: LabeledPrice must be an Object")
            if not str(price.get("label") or ""):
                raise bad_request("can't parse labeled price: LabeledPrice label must be non-empty")
        if not prices:
            raise bad_request("there must be at least one price")
        # Telegram's own checks from here
        if len(title) > 32:
            raise bad_request("TITLE_INVALID")  # name not in any source found
        if len(description) > 255:
            raise bad_request("DESCRIPTION_INVALID")  # name not in any source found
        if len(payload.encode()) > 128:
            raise bad_request("INVOICE_PAYLOAD_INVALID")
        if currency != "XTR":
            raise bad_request("CURRENCY_INVALID")  # this fake models Stars only; name not in any source found
        if params.get("provider_token"):
            raise bad_request("PROVIDER_TOKEN_INVALID")  # Stars take an empty provider token; name not in a source
        if len(prices) != 1:
            raise bad_request("STARS_INVOICE_INVALID")  # exactly one price for XTR
        amount = prices[0].get("amount")
        if not isinstance(amount, int) or not 1 <= amount <= MAX_STARS:
            raise bad_request("CURRENCY_TOTAL_AMOUNT_INVALID")
        return {"title": title, "description": description, "payload": payload, "currency": currency,
                "total_amount": amount}

    def _send_invoice(self, params, files):
        chat = self._writable_chat(params)
        if "subscription_period" in params:
            raise bad_request("SUBSCRIPTION_PERIOD_INVALID")  # subscriptions only by createInvoiceLink (a guessed name)
        details = self._invoice_params(params)
        content = {"invoice": {"title": details["title"], "description": details["description"],
                               "start_parameter": "", "currency": "XTR",
                               "total_amount": details["total_amount"]}}
        markup = self._markup(params, inline_only=bool(params.get("reply_markup")))
        if markup:
            content["reply_markup"] = markup
        message = self._new_message(chat, self.bot_user, **content)
        self._invoices[(chat.info["id"], message["message_id"])] = details
        return message

    def _create_invoice_link(self, params, files):
        details = self._invoice_params(params)
        if "subscription_period" in params:
            if int(params["subscription_period"]) != STARS_SUBSCRIPTION_PERIOD:
                raise bad_request("SUBSCRIPTION_PERIOD_INVALID")
            details["subscription_period"] = STARS_SUBSCRIPTION_PERIOD
        link = "https://t.me/$" + secrets.token_urlsafe(12)
        self.invoice_links[link] = details
        return link

    def _answer_pre_checkout_query(self, params, files):
        ok = _flag(params, "ok")
        error = None if ok else _required(params, "error_message")  # the Bot API checks this first
        query = self.pre_checkouts.get(str(params.get("pre_checkout_query_id", "")))
        if query is None or query["answer"] is not None:
            raise bad_request(QUERY_ID_INVALID)  # Telegram's QUERY_ID_INVALID, as the Bot API words it
        seconds = time.monotonic() - query["asked"]
        if seconds > PRE_CHECKOUT_TIMEOUT:
            query["answer"] = {"ok": False, "error_message": None, "seconds": seconds, "charge_id": None}
            raise bad_request(QUERY_ID_INVALID)  # too late: the user saw the payment fail
        charge_id = self._charge(query["user"], query["invoice"], query["drop"]) if ok else None
        query["answer"] = {"ok": ok, "error_message": error, "seconds": seconds, "charge_id": charge_id}
        return True

    def _get_star_transactions(self, params, files):
        # Client::get_integer_arg clamps: never an error (offset from 0, limit 1-100, 100 when absent)
        offset = max(_td_integer(params.get("offset")), 0)
        limit = min(max(_td_integer(params.get("limit"), 100), 1), 100)
        return {"transactions": self.star_transactions[offset:offset + limit]}

    def _charge_of(self, params, unknown):
        user_id = _user_id(params)  # before Telegram is asked
        charge = self.charges.get(str(params.get("telegram_payment_charge_id", "")))
        if charge is None:
            raise bad_request(unknown)
        if user_id != charge["user"]["id"]:
            # USER_ID_INVALID is what payments.refundStarsCharge and botCancelStarsSubscription list for a bad
            # user; that Telegram answers it for a charge of another user is in no source found
            raise bad_request("USER_ID_INVALID")
        return charge

    def _refund_star_payment(self, params, files):
        _user_id(params)
        _required(params, "telegram_payment_charge_id")  # the Bot API's own check
        # An unknown charge: CHARGE_NOT_FOUND is not in payments.refundStarsCharge's documented errors
        # (CHARGE_ALREADY_REFUNDED, CHARGE_ID_EMPTY, USER_BOT_REQUIRED, USER_ID_INVALID); it is what a library's
        # tests against the live Bot API saw (another's saw CHARGE_ID_EMPTY for the id "test").
        charge = self._charge_of(params, "CHARGE_NOT_FOUND")
        if charge["refunded"]:
            raise bad_request("CHARGE_ALREADY_REFUNDED")  # documented; seen live (tdlib/telegram-bot-api#690)
        charge["refunded"] = True
        charge_id = str(params["telegram_payment_charge_id"])
        self.star_transactions.append({"id": charge_id, "amount": charge["amount"], "date": self._now(),
                                       "receiver": {"type": "user", "transaction_type": "invoice_payment",
                                                    "user": charge["user"],
                                                    "invoice_payload": charge["invoice"]["payload"]}})
        return True

    def _edit_user_star_subscription(self, params, files):
        # the Bot API checks only user_id; a missing charge id goes to Telegram empty, a missing is_canceled is false
        # CHARGE_ID_INVALID: payments.botCancelStarsSubscription's documented error, also seen live for an unknown id
        charge = self._charge_of(params, "CHARGE_ID_INVALID")
        if not charge["invoice"].get("subscription_period"):
            raise bad_request("SUBSCRIPTION_NOT_FOUND")  # a one-off charge: this name is in no source found
        canceled = _flag(params, "is_canceled")
        root = self.charges[charge["root"]]  # the state belongs to the subscription, whichever charge names it
        if root["canceled"] == canceled:
            # not in the method's documented errors; the name bots in production test for
            raise bad_request("SUBSCRIPTION_NOT_MODIFIED")
        root["canceled"] = canceled
        return True

    # -- internals: API methods ----------------------------------------------

    def _get_me(self, params, files):
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False, "can_connect_to_business": False,
                "has_main_web_app": False}

    def _get_updates(self, params, files):
        if self.webhook_url:
            raise TelegramError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                     "use deleteWebhook to delete the webhook first")
        self._poll_generation += 1
        generation = self._poll_generation
        self._polling += 1
        self._cond.notify_all()  # wakes an older poll so it can end with 409 Conflict
        try:
            return self._long_poll(params, generation)
        finally:
            self._polling -= 1

    def _long_poll(self, params, generation):
        offset = int(params.get("offset") or 0)
        limit = min(max(int(params.get("limit") or 100), 1), 100)
        deadline = time.monotonic() + max(float(params.get("timeout") or 0), 0)
        if "allowed_updates" in params:
            allowed = _decode_json(params["allowed_updates"])
            self._allowed_updates = set(allowed) if allowed else None
        if offset < 0:
            while len(self._updates) > -offset:
                self._updates.popleft()
        while self._updates and self._updates[0]["update_id"] < offset:
            self._updates.popleft()
            self.confirmed += 1
        while True:
            self._make_synthetic()
            self._drop_unwanted()
            batch = list(itertools.islice(self._updates, limit))
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0 or self._closing:
                return batch
            self._cond.wait(remaining)
            if generation != self._poll_generation:
                raise TelegramError(409, "Conflict: terminated by other getUpdates request; "
                                         "make sure that only one bot instance is running")

    def _drop_unwanted(self):
        if self._allowed_updates is None:
            return
        # Telegram never stores updates of the kinds the bot opted out of
        for update in [u for u in self._updates if not (u.keys() - {"update_id"}) & self._allowed_updates]:
            self._updates.remove(update)

    def _make_synthetic(self):
        if not self.synthetic or self._updates:
            return
        batch, users, text, total = self.synthetic
        stop = min(self.synthetic_made + batch, total) if total else self.synthetic_made + batch
        for n in range(self.synthetic_made, stop):
            user_id = 500000000 + n % users
            self.send_text({"id": user_id, "first_name": f"User{user_id}", "language_code": "ru"}, text)
        self.synthetic_made = max(stop, self.synthetic_made)

    def _delete_webhook(self, params, files):
        self._webhook_generation += 1
        self.webhook_secret = ""
        self.webhook_url = ""
        if _flag(params, "drop_pending_updates"):
            self._updates.clear()
        return True

    def _set_webhook(self, params, files):
        url = str(params.get("url", "")).strip()
        secret = str(params.get("secret_token", ""))
        if url:
            parts = urlsplit(url)
            if parts.scheme != "https" and not (self.local and parts.scheme == "http"):
                raise bad_request("bad webhook: HTTPS url must be provided for webhook")
            if not parts.hostname:
                raise bad_request("bad webhook: Wrong HTTP URL")
            if "secret_token" in params and not WEBHOOK_SECRET_RE.fullmatch(secret):
                raise bad_request("secret token contains unallowed characters")
            connections = int(params.get("max_connections") or 40)
            if not 1 <= connections <= 100:
                raise bad_request("bad webhook: max_connections must be between 1 and 100")
        if "allowed_updates" in params:
            allowed = _decode_json(params["allowed_updates"])
            self._allowed_updates = set(allowed) if allowed else None
        if _flag(params, "drop_pending_updates"):
            self._updates.clear()
        self.webhook_url = url
        self.webhook_secret = secret if url else ""
        self._webhook_generation += 1
        if url:  # Telegram starts POSTing the pending updates at once
            for n in range(min(connections, self.webhook_senders)):
                threading.Thread(target=self._deliver, args=(self._webhook_generation,), daemon=True,
                                 name=f"fake-telegram-webhook-{n}").start()
        self._cond.notify_all()
        return True

    def _get_webhook_info(self, params, files):
        info = {"url": self.webhook_url, "has_custom_certificate": False,
                "pending_update_count": len(self._updates)}
        if self.webhook_error:
            info["last_error_message"] = self.webhook_error
        if self._allowed_updates is not None and self.webhook_url:
            info["allowed_updates"] = sorted(self._allowed_updates)
        return info

    def _deliver(self, generation):
        """POST pending updates to the webhook, one at a time per sender, until the webhook changes.

        Like Telegram: the secret rides in X-Telegram-Bot-Api-Secret-Token, only a 2xx reply confirms an
        update, anything else (or no reply) leaves it pending and is retried after a pause.
        """
        session = requests.Session()
        while True:
            with self._cond:
                while True:
                    if self._closing or generation != self._webhook_generation:
                        return
                    self._make_synthetic()
                    self._drop_unwanted()
                    update = next((u for u in self._updates if u["update_id"] not in self._in_flight), None)
                    if update is not None:
                        break
                    self._cond.wait(0.5)
                self._in_flight.add(update["update_id"])
                url, secret = self.webhook_url, self.webhook_secret
            headers = {"Content-Type": "application/json"}
            if secret:
                headers["X-Telegram-Bot-Api-Secret-Token"] = secret
            try:
                reply = session.post(url, data=json.dumps(update, ensure_ascii=False).encode(), headers=headers,
                                     timeout=(2, 60))
                error = None if 200 <= reply.status_code < 300 else f"Wrong response from the webhook: {reply.status_code} {reply.reason}"
            except requests.RequestException as exc:
                error = f"Connection failed: {type(exc).__name__}"
            with self._cond:
                self._in_flight.discard(update["update_id"])
                if error is None:
                    if update in self._updates:
                        self._updates.remove(update)
                        self.confirmed += 1
                        self.webhook_delivered += 1
                else:
                    self.webhook_error = error
                    self.webhook_failures += 1
                self._cond.notify_all()
            if error is not None:
                time.sleep(self.webhook_retry_seconds)

    def _send_message(self, params, files):
        chat = self._writable_chat(params)
        text, entities = _formatted(str(params.get("text", "")), params.get("parse_mode"), self.strict_html)
        if not text:
            raise bad_request("message text is empty")
        if utf16_len(text) > MAX_TEXT:
            raise bad_request("message is too long")
        markup = self._markup(params)
        content = {"text": text}
        if entities:
            content["entities"] = entities
        if markup and "inline_keyboard" in markup:
            content["reply_markup"] = markup  # only inline keyboards ride on the Message
        return self._new_message(chat, self.bot_user, **content)

    def _send_photo(self, params, files):
        chat = self._writable_chat(params)
        if "photo" in files:
            data = files["photo"]
            if not data:
                raise bad_request("file must be non-empty")
            size = _image_size(data)
            if size is None:
                raise bad_request("IMAGE_PROCESS_FAILED")
            file_id = f"AgACAgIAAxkDAAI{next(self._file_ids):08d}"
            self._files[file_id] = data
        else:
            file_id = str(params.get("photo", ""))
            if re.match(r"https?://", file_id):
                # Telegram's servers cannot reach a test's loopback URLs either
                raise bad_request("failed to get HTTP URL content")
            if file_id not in self._files:
                raise bad_request("wrong file identifier/HTTP URL specified")
            data, size = self._files[file_id], _image_size(self._files[file_id])
        content = {"photo": [{"file_id": file_id, "file_unique_id": "AQAD" + file_id[-8:],
                              "file_size": len(data), "width": size[0], "height": size[1]}]}
        if params.get("caption"):
            caption, entities = _formatted(str(params["caption"]), params.get("parse_mode"), self.strict_html)
            if utf16_len(caption) > MAX_CAPTION:
                raise bad_request("message caption is too long")
            content["caption"] = caption
            if entities:
                content["caption_entities"] = entities
        markup = self._markup(params)
        if markup and "inline_keyboard" in markup:
            content["reply_markup"] = markup
        return self._new_message(chat, self.bot_user, **content)

    def _edit(self, message, changes):
        """Apply changes unless they change nothing, in which case Telegram refuses."""
        if all(message.get(key) == value for key, value in changes.items()):
            raise bad_request(NOT_MODIFIED)
        for key, value in changes.items():
            if value is None:
                message.pop(key, None)
            else:
                message[key] = value
        message["edit_date"] = self._now()
        return message

    def _edit_message_text(self, params, files):
        chat, message = self._bot_message(params)
        if message["from"]["id"] != self.bot_user["id"]:
            raise bad_request("message can't be edited")
        if "text" not in message:
            raise bad_request("there is no text in the message to edit")
        text, entities = _formatted(str(params.get("text", "")), params.get("parse_mode"), self.strict_html)
        if not text:
            raise bad_request("message text is empty")
        if utf16_len(text) > MAX_TEXT:
            raise bad_request("message is too long")
        # leaving reply_markup out removes the keyboard, exactly as on Telegram
        return self._edit(message, {"text": text, "entities": entities or None,
                                    "reply_markup": self._markup(params, inline_only=True)})

    def _edit_message_reply_markup(self, params, files):
        chat, message = self._bot_message(params)
        if message["from"]["id"] != self.bot_user["id"]:
            raise bad_request("message can't be edited")
        return self._edit(message, {"reply_markup": self._markup(params, inline_only=True)})

    def _delete_message(self, params, files):
        chat, message = self._bot_message(params, verb="delete")
        del chat.messages[message["message_id"]]
        return True

    def _answer_callback_query(self, params, files):
        query_id = str(params.get("callback_query_id", ""))
        query = self._queries.get(query_id)
        if query is None or query["answered"]:
            raise bad_request(QUERY_TOO_OLD)
        if self.answer_limit is not None and self._clock() - query["pressed"] > self.answer_limit:
            raise bad_request(QUERY_TOO_OLD)
        if utf16_len(str(params.get("text", ""))) > MAX_CALLBACK_ANSWER:
            raise bad_request("MESSAGE_TOO_LONG")
        query["answered"] = True
        answer = {"callback_query_id": query_id, "update_id": query["update_id"],
                  "text": params.get("text"), "show_alert": _flag(params, "show_alert"),
                  "url": params.get("url"), "time": self._clock()}
        self.callback_answers.append(answer)
        self._answers_by_update[query["update_id"]] = answer
        return True

    def _get_chat(self, params, files):
        chat = self._chat(params)
        gifts = {"unlimited_gifts": False, "limited_gifts": False, "unique_gifts": False,
                 "premium_subscription": False, "gifts_from_channels": False}
        return {**chat.info, "accent_color_id": 0, "max_reaction_count": 11,
                "accepted_gift_types": gifts}

    def _get_chat_member(self, params, files):
        chat = self._chat(params)
        raw = str(params.get("user_id", "")).strip()
        if not raw.isdigit():
            raise bad_request("invalid user_id specified")
        if not chat.members_visible:
            raise bad_request("member list is inaccessible")
        user_id = int(raw)
        user = self._users.get(user_id) or {"id": user_id, "is_bot": False, "first_name": "User"}
        status, is_member = chat.members.get(user_id, ("left", None))
        member = {"user": user, "status": status}
        if status in ("creator", "administrator"):
            member["is_anonymous"] = False
        if status == "administrator":
            member.update({name: True for name in (
                "can_manage_chat", "can_delete_messages", "can_manage_video_chats",
                "can_restrict_members", "can_change_info", "can_invite_users",
                "can_post_messages", "can_edit_messages")})
            member.update({name: False for name in (
                "can_be_edited", "can_promote_members", "can_post_stories",
                "can_edit_stories", "can_delete_stories")})
        elif status == "restricted":
            member["is_member"] = True if is_member is None else bool(is_member)
            member["until_date"] = 0
            member.update({name: False for name in (
                "can_send_messages", "can_send_audios", "can_send_documents", "can_send_photos",
                "can_send_videos", "can_send_video_notes", "can_send_voice_notes", "can_send_polls",
                "can_send_other_messages", "can_add_web_page_previews", "can_change_info",
                "can_invite_users", "can_pin_messages", "can_manage_topics")})
        elif status == "kicked":
            member["until_date"] = 0
        return member

    def _send_chat_action(self, params, files):
        self._writable_chat(params)
        if params.get("action") not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    def _commands_key(self, params):
        scope = _decode_json(params.get("scope")) or {"type": "default"}
        return json.dumps(scope, sort_keys=True), str(params.get("language_code", ""))

    def _set_my_commands(self, params, files):
        commands = _decode_json(params.get("commands", "[]"))
        if not isinstance(commands, list):
            raise bad_request("can't parse commands JSON object")
        for command in commands:
            if not BOT_COMMAND_NAME_RE.fullmatch(str(command.get("command", ""))):
                raise bad_request("BOT_COMMAND_INVALID")
        self.commands[self._commands_key(params)] = commands
        return True

    def _get_my_commands(self, params, files):
        return self.commands.get(self._commands_key(params), [])

    def _delete_my_commands(self, params, files):
        self.commands.pop(self._commands_key(params), None)
        return True


    def _describe(self, params, kind, limit):
        text = str(params.get(kind, ""))
        language = str(params.get("language_code", ""))
        if language and not re.fullmatch(r"[a-z]{2}", language):
            raise bad_request("LANG_CODE_INVALID")
        if utf16_len(text) > limit:
            raise bad_request("BOT_ABOUT_INVALID" if kind == "short_description" else "BOT_DESCRIPTION_INVALID")
        if text:
            self.descriptions[(kind, language)] = text
        else:
            self.descriptions.pop((kind, language), None)
        return True

    def _set_my_description(self, params, files):
        return self._describe(params, "description", MAX_DESCRIPTION)

    def _set_my_short_description(self, params, files):
        return self._describe(params, "short_description", MAX_SHORT_DESCRIPTION)

    def _get_my_description(self, params, files):
        language = str(params.get("language_code", ""))
        return {"description": self.descriptions.get(("description", language), "")}

    def _get_my_short_description(self, params, files):
        language = str(params.get("language_code", ""))
        return {"short_description": self.descriptions.get(("short_description", language), "")}


def main(argv=None):
    """Serve the fake until SIGTERM/SIGINT, printing its URL first and a JSON summary last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--username", default=DEFAULT_USERNAME)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every call")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="answer each getUpdates that finds no updates with N new text messages")
    parser.add_argument("--users", type=int, default=1000, help="distinct synthetic senders")
    parser.add_argument("--text", default="/start", help="text of synthetic messages")
    parser.add_argument("--total", type=int, default=0, help="stop after this many synthetic updates")
    parser.add_argument("--webhook-senders", type=int, default=8, help="parallel webhook deliveries at most")
    args = parser.parse_args(argv)
    fake = FakeTelegram(token=args.token, username=args.username, port=args.port,
                        record=False, history=20)
    fake.latency = args.latency
    fake.webhook_senders = args.webhook_senders
    if args.synthetic:
        fake.synthetic = (args.synthetic, max(args.users, 1), args.text, args.total)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(fake.url, flush=True)
    stop.wait()
    fake.close()
    print(json.dumps(fake.stats()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
