rule toyworld:
    output:
        manifest("toyworld"),
    params:
        cfg=slice_json("toyworld"),
        out=stage_dir("toyworld"),
    conda:
        ENV
    log:
        log_file("toyworld"),
    benchmark:
        bench_file("toyworld")
    shell:
        "python {SCRIPTS}/toyworld.py --out {params.out} --params {params.cfg:q} > {log} 2>&1"


def _sample_inputs(wc):
    source = source_of("sample", wc.folder)
    return {**variant_inputs("sample")(wc), **({} if toy_split(source) else {"data": data_path(source)})}


def _source_json(part):
    """Params function of the sample rule: its source's data keys (0) or sampling (1) as JSON."""
    return lambda wc: json.dumps(source_config(source_of("sample", wc.folder))[part], sort_keys=True)


# One rule for every data source's sample (the pool `data`, the SAE corpus, each of `pools`).
rule sample:
    input:
        unpack(_sample_inputs),
    output:
        f"{RESULTS}/{{folder}}/manifest.json",
    wildcard_constraints:
        folder=r"sample-[0-9a-f]{8}",
    params:
        cfg=_source_json(1),
        data=lambda wc: data_path(source_of("sample", wc.folder)),
        data_cfg=_source_json(0),
        out=lambda wc: f"{RESULTS}/{wc.folder}",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/{{folder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{folder}}.tsv"
    shell:
        "python {SCRIPTS}/sample.py --data {params.data:q} --data-params {params.data_cfg:q} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
