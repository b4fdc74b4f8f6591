from mlxd_worker.requests.stops import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = ""
    for d in deltas:
        text, hit = m.feed(d)
        out += text
        if hit:
            return out, True
    return out + m.flush(), False


def test_stop_split_across_deltas_is_never_shown() -> None:
    assert run(["</s>"], ["Hello <", "/", "s> more"]) == ("Hello ", True)


def test_a_false_start_is_released() -> None:
    assert run(["STOP"], ["ST", "ART here"]) == ("START here", False)
    assert run(["ab"], ["xa"]) == ("xa", False)


def test_earliest_of_several_stops_wins_and_no_stops_pass_through() -> None:
    assert run(["b", "a"], ["xxab"]) == ("xx", True)
    assert run([], ["a", "b"]) == ("ab", False)


def test_the_stop_that_was_hit_is_named() -> None:
    m = StopMatcher(["END", "x"])
    assert m.feed("a E") == ("a ", False) and m.matched is None
    assert m.feed("ND x") == ("", True) and m.matched == "END"  # the earliest in the text
    m = StopMatcher(["END", "x"])
    assert m.feed("a x END") == ("a ", True) and m.matched == "x"
