"""Forward mode's domain lists: each format, matching by domain and subdomain, errors naming FILE:LINE."""

import logging

import pytest

from addons.forward.lists import ListError, detect_format, load_list, parse_list


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_hosts_file_every_address_form_and_comment(tmp_path):
    path = write(tmp_path, "malware.txt", (
        "# a hosts file\n"
        "127.0.0.1 localhost\n"
        "::1 localhost ip6-localhost\n"
        "0.0.0.0 0.0.0.0\n"
        "0.0.0.0 ads.example    # inline comment\n"
        "127.0.0.1\tx.example y.example\n"
        "\n"
        ":: Tracker.Example.\n"
    ))
    listed = load_list(path, "malware")
    assert (listed.name, listed.format, len(listed)) == ("malware", "hosts", 4)
    assert listed.matches("ads.example") and listed.matches("cdn.ads.example")
    assert listed.matches("x.example") and listed.matches("y.example")
    assert listed.matches("tracker.example") and listed.matches("TRACKER.example.")
    assert not listed.matches("localhost")            # the file's own boilerplate is no entry
    assert not listed.matches("example")              # never a parent
    assert not listed.matches("z.example")            # never a sibling
    assert not listed.matches("notads.example")       # a suffix match is by whole labels


def test_plain_list_prefixes_case_idn_and_ip_literals(tmp_path):
    path = write(tmp_path, "social.conf", (
        "# social networks\n"
        "Social.Example\n"
        "*.chat.example\n"
        ".video.example\n"
        "bücher.example\n"
        "xn--caf-dma.example\n"
        "203.0.113.7\n"
        "2001:db8::1\n"
    ))
    listed = load_list(path, "social")
    assert (listed.format, len(listed)) == ("plain", 7)
    for host in ("social.example", "www.social.example", "SOCIAL.EXAMPLE.", "chat.example", "a.b.chat.example",
                 "video.example", "xn--bcher-kva.example", "www.Bücher.example", "café.example",
                 "203.0.113.7", "2001:db8:0::1", "[2001:db8::1]"):
        assert listed.matches(host), host
    for host in ("example", "other.example", "203.0.113.8", "7", "113.7", "2001:db8::2", "socialexample"):
        assert not listed.matches(host), host


def test_registrable_domains_public_suffixes_and_siblings(tmp_path, caplog):
    path = write(tmp_path, "block.txt", "example.co.uk\na.example.com\nco.uk\ncom\ngithub.io\n")
    with caplog.at_level(logging.WARNING, logger="addons.forward.lists"):
        listed = load_list(path, "block")
    assert listed.matches("www.example.co.uk") and listed.matches("example.co.uk")
    assert not listed.matches("other.co.uk") and not listed.matches("co.uk")
    assert listed.matches("x.a.example.com")
    assert not listed.matches("b.example.com") and not listed.matches("example.com")
    # the ICANN public suffixes are skipped, named by file and line; a private suffix is the operator's
    assert listed.warnings == [f"{path}:3: 'co.uk' skipped: a public suffix (it would match every site under it)",
                               f"{path}:4: 'com' skipped: a public suffix (it would match every site under it)"]
    assert f"{path}:3: 'co.uk' skipped" in caplog.text
    assert not listed.matches("anything.com")
    assert listed.matches("someone.github.io")
    assert len(listed) == 3


def test_adblock_host_rules_decide_a_connect_without_a_url(tmp_path):
    path = write(tmp_path, "easylist.txt", (
        "[Adblock Plus 2.0]\n"
        "! Title: test list\n"
        "||ads.example^\n"
        "||Tracker.Example^$important\n"
        "@@||ok.ads.example^\n"
        "@@||tracker.example^\n"
        "||doc.example^$document\n"
        "||third.example^$third-party\n"
        "||script.example^$script\n"
        "/banner/*\n"
        "||paths.example/ads/\n"
        "example.org##.ad-box\n"
        "##.sponsored\n"
    ))
    listed = load_list(path, "ads")
    assert (listed.format, len(listed)) == ("adblock", 9)      # cosmetic rules are no network rules
    assert listed.matches("ads.example") and listed.matches("x.ads.example")
    assert not listed.matches("ok.ads.example") and not listed.matches("y.ok.ads.example")   # the exception
    assert listed.matches("tracker.example") and listed.matches("sub.tracker.example")       # $important wins
    assert listed.matches("doc.example")
    # rules that need more than a host never decide a CONNECT
    for host in ("third.example", "script.example", "paths.example", "banner.example"):
        assert not listed.matches(host), host


def test_adblock_full_syntax_through_the_engine_when_a_url_is_given(tmp_path):
    listed = parse_list("||ads.example^\n@@||ok.ads.example^\n/banner/*\n||paths.example/ads/\n"
                        "||script.example^$script\n", "ads")
    assert listed.engine is not None
    assert listed.matches("z.example", "https://z.example/img/banner/1.png")
    assert not listed.matches("z.example", "https://z.example/img/logo.png")
    assert listed.matches("paths.example", "http://paths.example/ads/x.js")
    assert not listed.matches("paths.example", "http://paths.example/news/")
    assert listed.matches("cdn.ads.example", "https://cdn.ads.example/")
    assert not listed.matches("ok.ads.example", "https://ok.ads.example/")
    assert not listed.matches("script.example", "https://script.example/a.js")   # no resource type known
    assert listed.matches("bücher.ads.example", "https://bücher.ads.example/")
    # the host still decides when the url says nothing: unparsable, or naming another host
    assert listed.matches("ads.example", "not a url") and not listed.matches("z.example", "not a url")
    assert listed.matches("ads.example", "https://front.example/")
    assert listed.matches("front.example", "https://ads.example/")
    assert not listed.matches("ads.example", "https://ok.ads.example/")     # the url's exception wins


def test_adblock_list_of_host_rules_only_builds_no_engine():
    listed = parse_list("! oisd-style\n||ads.example^\n||b.example^$important\n@@||ok.ads.example^\n", "dns")
    assert listed.engine is None
    assert listed.matches("ads.example", "https://ads.example/any/path")
    assert not listed.matches("ok.ads.example", "https://ok.ads.example/")
    assert not listed.matches("c.example", "https://c.example/")


@pytest.mark.parametrize(("lines", "expected"), [
    (["# comment", "", "example.com"], ("plain", 0)),
    (["# hosts", "0.0.0.0 a.example"], ("hosts", 2)),
    (["a.example", "||b.example^"], ("adblock", 2)),
    (["[Adblock Plus 2.0]"], ("adblock", 1)),
    (["! comment only"], ("adblock", 1)),
    (["##.ad"], ("adblock", 1)),
    (["203.0.113.1"], ("plain", 0)),                # a lone address is a plain entry, not a hosts line
])
def test_format_is_detected_from_content(lines, expected):
    assert detect_format(lines) == expected


def test_errors_name_file_and_line(tmp_path):
    path = write(tmp_path, "plain.txt", "good.example\nexa mple.example\nhttps://x.example/\n-ok-.example\n"
                                        "a..example\n")
    with pytest.raises(ListError) as caught:
        load_list(path, "plain")
    assert str(caught.value).splitlines() == [
        f"{path}:2: expected one domain, got 'exa mple.example'",
        f"{path}:3: 'https://x.example/' is not a domain name",
        f"{path}:5: 'a..example' is not a domain name",
    ]
    hosts = write(tmp_path, "hosts", "0.0.0.0 a.example\nb.example\n")
    with pytest.raises(ListError, match=rf"^{hosts}:2: expected 'ADDRESS HOST', got 'b.example' "
                                        r"\(a hosts list, as line 1 shows\)$"):
        load_list(hosts, "hosts")
    adblock_list = write(tmp_path, "ab.txt", "! list\n||bad host.example^\n")
    with pytest.raises(ListError, match=rf"^{adblock_list}:2: 'bad host.example' is not a domain name"):
        load_list(adblock_list, "ab")


def test_unreadable_files_are_config_errors(tmp_path):
    binary = write(tmp_path, "bin.txt", b"a.example\nb.example\n\xff\xfe\n", mode="wb")
    with pytest.raises(ListError, match=rf"^{binary}:3: not UTF-8 text$"):
        load_list(binary, "bin")
    with pytest.raises(ListError, match=r"missing.txt: cannot read the list 'gone'"):
        load_list(str(tmp_path / "missing.txt"), "gone")
    bom = write(tmp_path, "bom.txt", "\ufeffa.example\n")
    assert load_list(bom, "bom").matches("a.example")


def test_a_hundred_thousand_domains(tmp_path):
    """The size of a real subscription list loads and still answers by whole labels."""
    count = 100_000
    path = write(tmp_path, "big.txt", "".join(f"0.0.0.0 host{i}.zone{i % 97}.example\n" for i in range(count)))
    listed = load_list(path, "big")
    assert len(listed) == count
    assert listed.matches("host0.zone0.example") and listed.matches("www.host99999.zone89.example")
    assert not listed.matches("host0.zone1.example") and not listed.matches("zone0.example")
