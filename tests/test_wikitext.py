"""The built-in Wikipedia calibration text: markup cleaning (runtime/wikitext.py) and the "wiki" name."""
import pytest

from runtime.quant import calib_data
from runtime.wikitext import articles, plain_text

PROSE = "The quick brown fox jumps over the lazy dog, as every typist has learned at some point in life."
DUMP = f"""<mediawiki><page><title>Fox</title><revision><text xml:space="preserve">{{{{Infobox animal|name={{{{nested|x}}}}}}}}
'''Fox''' is a [[Canidae|canid]] of [[Europe]].&lt;ref&gt;A book, p. 3&lt;/ref&gt; {PROSE}
== History ==
[[File:Fox.jpg|thumb|A [[red fox]] in snow]]
* A list item that is long enough to be kept as a paragraph of prose, with an [http://example.org external link].
{{| class="wikitable"
| cell || cell
|}}
Short line.
&lt;!-- a comment --&gt;[[Category:Animals]]
</text></revision></page>
<page><title>Vulpes</title><revision><text>#REDIRECT [[Fox]]</text></revision></page></mediawiki>"""


def test_markup_is_cleaned_to_prose():
    got = articles(DUMP)
    assert [t for t, _ in got] == ["Fox"]                                  # the redirect is skipped
    text = got[0][1]
    assert text.splitlines() == [
        "Fox is a canid of Europe. " + PROSE,
        "A list item that is long enough to be kept as a paragraph of prose, with an external link.",
    ]
    assert plain_text(DUMP) == text
    for junk in ("{{", "}}", "[[", "ref", "Category", "thumb", "http", "==", "'''", "cell", "comment", "Short"):
        assert junk not in text


def test_wiki_names_the_built_in_text_unless_a_file_has_that_name(monkeypatch, tmp_path):
    import runtime.assets
    monkeypatch.setattr(runtime.assets, "wiki_text", lambda: "built-in wikipedia prose")
    monkeypatch.chdir(tmp_path)
    assert calib_data.calibration_text("wiki") == "built-in wikipedia prose"
    assert calib_data.calibration_key("wiki") == "builtin:wiki"
    (tmp_path / "wiki").write_text("a local file called wiki")
    assert calib_data.calibration_text("wiki") == "a local file called wiki"
    assert calib_data.calibration_key("wiki") == "a local file called wiki"
    with pytest.raises(ValueError, match="'wiki'"):
        calib_data.calibration_text(str(tmp_path / "missing.txt"))


def test_the_built_in_wikipedia_text_is_long_clean_prose():
    """The real asset (gensim's wheel, downloaded once like lee_background): 106 articles of
    prose, ~2.7 MB, no markup left, nothing shared with the perplexity text."""
    from runtime.assets import lee_background_split, wiki_text
    text = wiki_text()
    assert 2_000_000 < len(text) < 4_000_000
    assert text.startswith("Anarchism is a political philosophy")
    for junk in ("{{", "}}", "[[", "]]", "&lt;", "<ref", "'''", "http://"):
        assert text.count(junk) < 20, junk                # a stray one in odd markup is tolerated
    words = lee_background_split()[0].split()
    shingles = {" ".join(words[i:i + 8]) for i in range(0, len(words) - 8)}
    wiki_words = text.split()
    assert not any(" ".join(wiki_words[i:i + 8]) in shingles for i in range(0, len(wiki_words) - 8, 4))
