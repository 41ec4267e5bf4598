"""`fewstep bench reliability` without servers: its parser, its metric reader and its bad-request lists."""

from fewstep.benchmarks import reliability as rel


def test_parser_defaults_and_choices():
    args = rel.build_parser().parse_args([])
    assert args.out == "benchmarks/results/reliability" and not args.quick and args.only is None
    args = rel.build_parser().parse_args(["--quick", "--only", "keys", "big_body"])
    assert args.quick and args.only == ["keys", "big_body"]
    assert set(rel.RUNNERS) == set(rel.SCENARIOS) == set(rel.SERVER_ARGS)


def test_metric_sums_matching_samples():
    text = ('fewstep_requests_cancelled_total{model="m",reason="disconnect",stage="queued"} 3.0\n'
            'fewstep_requests_cancelled_total{model="m",reason="disconnect",stage="running"} 1.0\n'
            'fewstep_requests_cancelled_total{model="m",reason="deadline",stage="queued"} 2.0\n'
            'fewstep_active_sessions 0.0\n'
            'fewstep_requests_total{model="m",status="200"} 5.0\nfewstep_requests_total{model="m",status="503"} 7.0\n')
    assert rel.metric(text, "fewstep_requests_cancelled_total", reason="disconnect") == 4
    assert rel.metric(text, "fewstep_requests_cancelled_total") == 6
    assert rel.metric(text, "fewstep_active_sessions") == 0
    assert rel.status_counts(text) == {"200": 5.0, "503": 7.0}


def test_at_least_200_distinct_bad_requests():
    names = ([n for n, _ in rel._image_cases()] + [n for n, _ in rel._other_http_cases("v")]
             + ["stream " + n for n, _ in rel._ws_stream_cases("v")]
             + ["realtime " + n for n, _ in rel._ws_realtime_cases()])
    assert len(names) == len(set(names)) >= 200


def test_error_of_reads_openai_bodies_and_plain_text():
    assert rel.error_of(400, '{"error": {"message": "bad", "code": "invalid_n"}}') == ("invalid_n", "bad")
    assert rel.error_of(405, '{"detail": "Method Not Allowed"}') == (None, "Method Not Allowed")
    assert rel.error_of(400, "Invalid HTTP request received.") == (None, "Invalid HTTP request received.")
