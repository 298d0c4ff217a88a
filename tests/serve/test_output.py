import random

from llama_jax.serve.output import StopStrings


def run(stops, pieces):
    matcher, sent = StopStrings(stops), []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        sent.append(text)
        if stopped:
            return sent, True
    sent.append(matcher.flush())
    return sent, False


def reference(stops, text):
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def test_random_splits_equal_cutting_the_whole_text():
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        sent, stopped = run(stops, pieces)
        assert ("".join(sent), stopped) == reference(stops, text), (text, stops, pieces)


def test_holds_back_only_a_possible_stop_prefix():
    matcher = StopStrings(["</end>"])
    assert matcher.push("Hello </e") == ("Hello ", False)  # "</e" may begin the stop string
    assert matcher.push("xtra") == ("</extra", False)  # it did not: sent in full
    assert matcher.push(" done </en") == (" done ", False)
    assert matcher.push("d> never sent") == ("", True)


def test_a_stop_string_longer_than_many_pieces():
    sent, stopped = run(["STOP HERE"], ["ab", "S", "T", "O", "P", " ", "H", "E", "R", "E", "zz"])
    assert sent == ["ab", "", "", "", "", "", "", "", "", ""] and stopped


def test_no_stop_strings_sends_everything_at_once():
    assert StopStrings([]).push("anything") == ("anything", False)
