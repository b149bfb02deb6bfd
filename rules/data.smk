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


rule sample:
    input:
        **inputs("sample"),
        **({} if TOY_DATA else {"data": data_path()}),
    output:
        manifest("sample"),
    params:
        cfg=slice_json("sample"),
        data=data_path(),
        data_cfg=slice_json("data"),
        out=stage_dir("sample"),
    conda:
        ENV
    log:
        log_file("sample"),
    benchmark:
        bench_file("sample")
    shell:
        "python {SCRIPTS}/sample.py --data {params.data:q} --data-params {params.data_cfg:q} --out {params.out} --params {params.cfg:q} > {log} 2>&1"
