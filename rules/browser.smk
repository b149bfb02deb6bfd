# The feature browser: a static site over the default SAE's features (opens from disk, no server).
rule browser:
    input:
        **inputs("browser"),
    output:
        manifest("browser"),
    params:
        cfg=slice_json("browser"),
        model_cfg=slice_json("model"),
        samples=stage_dir("sample"),
        extract=stage_dir("extract"),
        encode=stage_dir("encode"),
        features=stage_dir("features"),
        model=model_path(),
        out=stage_dir("browser"),
    conda:
        ENV
    log:
        log_file("browser"),
    benchmark:
        bench_file("browser")
    shell:
        "python {SCRIPTS}/browser.py --features {params.features} --encode {params.encode}"
        " --extract {params.extract} --samples {params.samples} --model {params.model}"
        " --model-params {params.model_cfg:q} --out {params.out} --params {params.cfg:q} > {log} 2>&1"


# A stable address for the newest browser of this run: results/{run}/browser.html forwards to it.
rule latest_browser:
    input:
        manifest("browser"),
    output:
        f"{RESULTS}/browser.html",
    params:
        target=f"{Path(stage_dir('browser')).name}/index.html",
    conda:
        ENV
    log:
        f"{RESULTS}/logs/latest_browser.log",
    shell:
        "python -c 'import sys; from mmsae.interpret.browser import write_redirect; write_redirect(sys.argv[1], sys.argv[2])'"
        " {output:q}.tmp {params.target:q} > {log} 2>&1 && mv {output:q}.tmp {output:q}"
