"""Telegram HTML (https://core.telegram.org/bots/api#html-style): escaping, the visible text, Telegram's limits.

Telegram counts limits on the visible text after parsing the entities, in UTF-16 code units (an emoji is 2).
"""
import re
from html import escape, unescape

MAX_MESSAGE = 4096  # Telegram's limits, in UTF-16 code units of the visible text (after entity parsing)
MAX_CAPTION = 1024
MAX_CALLBACK_ANSWER = 200
MAX_DESCRIPTION = 512
MAX_SHORT_DESCRIPTION = 120
ELLIPSIS = '…'
# the tags of the Bot API's HTML style
TAGS = frozenset({'b', 'strong', 'i', 'em', 'u', 'ins', 's', 'strike', 'del', 'tg-spoiler', 'span', 'a', 'code',
                  'pre', 'blockquote', 'tg-emoji'})
TOKEN_RE = re.compile(r'(<[^<>]*>)|(&(?:lt|gt|amp|quot|#[0-9]{1,7}|#x[0-9a-fA-F]{1,6});)|([^<>&]+)|([<>&])')


class Html(str):
    """Text already in Telegram HTML: t() and clip_html() take it as it is (any other value is escaped)."""


def html(text):
    """Escape outside text (a name, an email, an error) for Telegram HTML."""
    return Html(escape(text or '', quote=True))


def visible(markup):
    """Return the text Telegram shows for our Telegram HTML: tags dropped, entities decoded."""
    return unescape(re.sub(r'<[^<>]*>', '', markup))


def utf16_len(text):
    """Return the length of text in UTF-16 code units, the unit of Telegram's limits (an emoji counts 2)."""
    return len(text.encode('utf-16-le')) // 2


def clip_plain(text, limit):
    """Cut plain text to at most limit UTF-16 units, ending in '…' when cut (never inside a surrogate pair)."""
    if utf16_len(text) <= limit:
        return text
    budget, kept = limit - 1, []
    for char in text:
        budget -= 2 if ord(char) > 0xFFFF else 1
        if budget < 0:
            break
        kept.append(char)
    return ''.join(kept) + ELLIPSIS


def clip_html(markup, limit=MAX_MESSAGE):
    """Cut our Telegram HTML so its visible text has at most limit UTF-16 units.

    The cut falls between visible characters, never inside a tag or an entity; '…' marks it and the tags
    still open are closed. Text within the limit comes back unchanged.
    """
    if utf16_len(visible(markup)) <= limit:
        return Html(markup)
    budget, out, open_tags = limit - 1, [], []
    for tag, entity, run, stray in TOKEN_RE.findall(markup):
        if tag:
            name = tag[1:-1].split()[0].lstrip('/').lower() if tag[1:-1].split() else ''
            if tag.startswith('</'):
                if open_tags:
                    open_tags.pop()
            elif not tag.endswith('/>'):
                open_tags.append(name)
            out.append(tag)
            continue
        pieces = [entity] if entity else list(run or stray)
        for piece in pieces:
            units = utf16_len(unescape(piece))
            if units > budget:
                out.append(ELLIPSIS)
                out.extend(f'</{name}>' for name in reversed(open_tags))
                return Html(''.join(out))
            budget -= units
            out.append(piece)
    return Html(''.join(out))


def check_html(markup):
    """Return what Telegram would refuse in markup (unknown or unclosed tags, a bare < or &), or ''."""
    open_tags = []
    for tag, entity, run, stray in TOKEN_RE.findall(markup):
        if stray and stray != '>':
            return 'write & as &amp; (and < as &lt;, > as &gt;)'
        if not tag:
            continue
        words = tag[1:-1].split()
        name = words[0].lower() if words else ''
        if name.startswith('/'):
            if not open_tags:
                return f'{tag} closes nothing'
            if name[1:] and name[1:] != open_tags[-1]:
                return f'{tag} does not close <{open_tags[-1]}>'
            open_tags.pop()
        elif name not in TAGS:
            return f'{tag} is not a tag Telegram knows'
        elif name == 'span' and not re.search(r'class\s*=\s*["\']?tg-spoiler', tag):
            return '<span> needs class="tg-spoiler"'
        else:
            open_tags.append(name)
    return f'<{open_tags[-1]}> is not closed' if open_tags else ''
