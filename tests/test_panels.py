"""PANELS_FILE: a good file, and every kind of hostile one gives one clear line naming panel and key."""
import os

import pytest

import panels

GOOD = '''
[[panels]]
name = "Germany"
url = "https://de.example.test:2053/secret/"
username = "admin"
password = "de-secret-pw"
inbound_id = 1
sub_url = "https://de.example.test:2096/sub"

[[panels]]
name = "Finland"
url = "http://127.0.0.1:9"
api_token = "fi-secret-token"
inbound_id = 3
sub_url = "https://fi.example.test/sub/"
enabled = false
'''


def write(tmp_path, text, mode=0o600):
    path = tmp_path / 'panels.toml'
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_good_file_gives_every_panel_in_order(tmp_path):
    found = panels.load(write(tmp_path, GOOD))
    assert [p.name for p in found] == ['Germany', 'Finland']
    germany, finland = found
    assert germany.url == 'https://de.example.test:2053/secret'
    assert germany.sub_url == 'https://de.example.test:2096/sub/'
    assert (germany.username, germany.password, germany.enabled) == ('admin', 'de-secret-pw', True)
    assert (finland.api_token, finland.inbound_id, finland.enabled) == ('fi-secret-token', 3, False)
    # secrets never show in a repr (which is what a log line or a traceback would print)
    assert 'secret-pw' not in repr(found) and 'secret-token' not in repr(found)
    assert set(germany.secrets) == {'de-secret-pw'}


def test_the_file_mode_is_reported(tmp_path):
    assert panels.readable_by_others(write(tmp_path, GOOD, 0o644))
    assert not panels.readable_by_others(write(tmp_path, GOOD, 0o640))


def panel(**keys):
    base = {'name': '"Germany"', 'url': '"https://de.example.test"', 'username': '"admin"',
            'password': '"pw-xyz-secret"', 'inbound_id': '1', 'sub_url': '"https://de.example.test/sub/"'}
    base.update(keys)
    lines = [f'{key} = {value}' for key, value in base.items() if value is not None]
    return '[[panels]]\n' + '\n'.join(lines) + '\n'


@pytest.mark.parametrize('text, expected', [
    ('', 'lists no panels'),
    ('[panels]\nname = "x"\n', 'lists no panels'),
    ('panels = 3\n', 'lists no panels'),
    ('[[panel]]\nname = "x"\n', "unknown top-level key 'panel'"),
    ('[[panels]\nname = "x"\n', 'is not valid TOML'),
    (panel(name=None), 'panel 1: name is missing'),
    (panel(url=None), "panel 'Germany': url is missing"),
    (panel(inbound_id=None), "panel 'Germany': inbound_id is missing"),
    (panel(sub_url=None), "panel 'Germany': sub_url is missing"),
    (panel(inbound_id='"1"'), 'inbound_id must be a whole number'),
    (panel(inbound_id='0'), 'inbound_id must be a whole number'),
    (panel(inbound_id='true'), 'inbound_id must be a whole number'),
    (panel(inbound_id='1.5'), 'inbound_id must be a whole number'),
    (panel(name='7'), 'panel 1: name must be a string'),
    (panel(name='"   "'), 'panel 1: name must be 1 to 32'),
    (panel(name='"' + 'x' * 33 + '"'), 'name must be 1 to 32'),
    (panel(url='"de.example.test"'), "panel 'Germany': url must be an http(s) URL"),
    (panel(sub_url='"ftp://x/"'), 'sub_url must be an http(s) URL'),
    (panel(password=None), 'needs api_token, or both username and password'),
    (panel(password='""'), 'needs api_token, or both username and password'),
    (panel(enabled='"no"'), 'enabled must be true or false'),
    (panel(pasword='"typo"'), "unknown key 'pasword'"),
    (panel() + panel(name='"germany"'), "names two panels 'germany'"),
])
def test_a_hostile_file_gives_one_clear_line(tmp_path, text, expected):
    with pytest.raises(panels.PanelsFileError) as caught:
        panels.load(write(tmp_path, text))
    message = str(caught.value)
    assert expected in message
    assert '\n' not in message
    assert 'pw-xyz-secret' not in message


def test_a_missing_or_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(panels.PanelsFileError, match='cannot be read: No such file'):
        panels.load(tmp_path / 'nope.toml')
    if os.geteuid() != 0:  # root reads anything
        path = write(tmp_path, GOOD, 0o000)
        with pytest.raises(panels.PanelsFileError, match='cannot be read: Permission denied'):
            panels.load(path)


def test_the_xui_settings_are_the_one_panel(settings):
    (only,) = panels.from_settings(settings)
    assert only.url == settings.xui_url and only.inbound_id == settings.xui_inbound_id
    assert only.enabled and only.password == settings.xui_password


def test_the_example_file_loads():
    from conftest import ROOT
    found = panels.load(ROOT / 'panels.example.toml')
    assert [panel.name for panel in found] == ['Germany', 'Finland']
    assert found[0].api_token and found[1].username == 'admin' and all(panel.enabled for panel in found)
