from mlxd_worker.stops import StopMatcher


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
