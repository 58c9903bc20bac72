//! Headless Chromium draws every chart of the HTML report (Debian's `chromium`).

use super::*;

// ---------------------------------------------------------------------------------------------
// Headless Chromium: the HTML report as a browser draws it.

/// Chromium from `LORA_DOCTOR_CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("LORA_DOCTOR_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "google-chrome-stable",
        ] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the HTML report test needs headless Chromium and none was found on PATH.\n\
         Install it with `apt-get install -y chromium` (Debian/Ubuntu; `.ci/run` does this in CI),\n\
         or point LORA_DOCTOR_CHROMIUM at a Chrome/Chromium binary."
    );
}

/// Runs Chromium headless on a local file with a fresh profile; stdout goes to `stdout_to`.
/// Flags: no sandbox (CI runs as root), no GPU, and no background networking so a closed
/// network does not stall it.
fn run_chromium(page: &Path, extra: &[String], height: u32, stdout_to: &Path) {
    let profile = tempfile::tempdir().expect("a fresh profile");
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size=1400,{height}"))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout_to).expect("stdout file"))
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start {}: {e}; install Chromium with `apt-get install -y chromium`",
            chromium().display()
        )
    });
    let started = Instant::now();
    loop {
        match child.try_wait().expect("waiting for chromium") {
            Some(status) => {
                assert!(status.success(), "chromium exited with {status}");
                return;
            }
            None if started.elapsed() > Duration::from_secs(120) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium did not finish within 120 s");
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Page-pixel rectangle of an element: x, y, width, height.
type Rect = (u32, u32, u32, u32);

/// Measures, in a copy of the page with a probe script added, the document height and the
/// rectangle of every chart (its SVG or table, not the full-width container), by dumping the
/// DOM after the script wrote them into an attribute. The report itself has no script.
fn measure(page: &str, dir: &Path) -> (u32, Vec<(String, Rect)>, String) {
    const PROBE: &str = "<script>(function(){var parts=[];\
        document.querySelectorAll('[data-state]').forEach(function(e){\
        var t=e.querySelector('svg, table')||e;var r=t.getBoundingClientRect();\
        parts.push(e.id+':'+[r.left+window.scrollX,r.top+window.scrollY,r.width,r.height]\
        .map(Math.round).join(','));});\
        document.body.setAttribute('data-test-layout','height:'+\
        document.documentElement.scrollHeight+';'+parts.join(';'));})();</script>";
    let probe = dir.join("probe.html");
    std::fs::write(&probe, page.replace("</body>", &format!("{PROBE}</body>"))).expect("write");
    let dom_path = dir.join("dom.html");
    run_chromium(&probe, &["--dump-dom".to_string()], 1200, &dom_path);
    let dom = std::fs::read_to_string(&dom_path).expect("the dumped DOM");
    let start = dom
        .find("data-test-layout=\"")
        .map(|i| i + "data-test-layout=\"".len())
        .expect("the probe ran and wrote its measurements");
    let layout = &dom[start..start + dom[start..].find('"').expect("closed attribute")];
    let mut height = 0;
    let mut rects = Vec::new();
    for part in layout.split(';') {
        let (key, value) = part.split_once(':').expect("key:value");
        if key == "height" {
            height = value.parse().expect("height");
            continue;
        }
        let n: Vec<u32> = value
            .split(',')
            .map(|v| v.parse::<i64>().expect("integer").max(0) as u32)
            .collect();
        rects.push((key.to_string(), (n[0], n[1], n[2], n[3])));
    }
    (height, rects, dom)
}

/// An RGB screenshot.
struct Image {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Image {
    fn read(path: &Path) -> Image {
        let file = std::fs::File::open(path).expect("the screenshot exists");
        let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("a sane size")];
        let info = reader.next_frame(&mut buf).expect("a frame");
        let channels = info.color_type.samples();
        let rgb = buf[..info.buffer_size()]
            .chunks_exact(channels)
            .flat_map(|px| [px[0], px[1 % channels], px[2 % channels]])
            .collect();
        Image {
            width: info.width,
            height: info.height,
            rgb,
        }
    }

    /// (distinct colours, share of pixels not of the most common colour) inside a rectangle.
    fn ink(&self, (x, y, w, h): Rect) -> (usize, f64) {
        let mut counts = std::collections::HashMap::new();
        let mut total = 0usize;
        for py in y..(y + h).min(self.height) {
            for px in x..(x + w).min(self.width) {
                let i = ((py * self.width + px) * 3) as usize;
                *counts
                    .entry((self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]))
                    .or_insert(0usize) += 1;
                total += 1;
            }
        }
        let dominant = counts.values().copied().max().unwrap_or(0);
        (
            counts.len(),
            if total == 0 {
                0.0
            } else {
                1.0 - dominant as f64 / total as f64
            },
        )
    }
}

/// Renders `page` in headless Chromium and checks that every container in `ids` holds a drawing:
/// measured in the DOM, then looked at in a screenshot (kept as `target/tmp/reports/{keep_as}`).
/// Returns the DOM Chromium built.
fn assert_charts_drawn(page: &str, ids: &[&str], keep_as: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let (height, rects, dom) = measure(page, dir.path());
    let shot = dir.path().join("report.png");
    let page_path = dir.path().join("report.html");
    std::fs::write(&page_path, page).expect("write the page");
    let window = height.clamp(800, 16_000);
    run_chromium(
        &page_path,
        &[format!("--screenshot={}", shot.display())],
        window,
        &dir.path().join("screenshot.log"),
    );
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reports");
    let _ = std::fs::create_dir_all(&kept);
    let _ = std::fs::copy(&shot, kept.join(keep_as));
    let image = Image::read(&shot);
    assert_eq!(image.width, 1400, "device scale factor 1");
    for id in ids {
        let (_, rect) = rects
            .iter()
            .find(|(name, _)| name == id)
            .unwrap_or_else(|| panic!("{id} was not measured"));
        let (x, y, w, h) = *rect;
        assert!(w >= 300 && h >= 100, "{id} is too small: {rect:?}");
        assert!(y + h <= image.height, "{id} lies below the screenshot");
        let inner = (x + 3, y + 3, w.saturating_sub(6), h.saturating_sub(6));
        let (colours, share) = image.ink(inner);
        assert!(
            colours >= 12 && share >= 0.02,
            "{id} looks blank: {colours} colours, {:.2}% ink (screenshot kept in {})",
            share * 100.0,
            kept.join(keep_as).display()
        );
        // Control: the page right of the chart is blank, so the measure can tell the two apart.
        if x + w + 40 < image.width {
            let right = (x + w + 20, y, image.width - (x + w + 20) - 10, h);
            let (_, blank) = image.ink(right);
            assert!(
                blank < 0.005,
                "{id}: the area right of it is not blank ({blank})"
            );
        }
    }
    dom
}

#[test]
fn html_report_draws_every_chart_in_headless_chromium() {
    let report = clean_report();
    let page = html::render(report, &HtmlOptions::default());
    let dom = assert_charts_drawn(&page, &CHARTS, "report.png");

    // From the DOM: the verdict banner and the precision matrix with a row per precision.
    let verdict_at = dom
        .find("id=\"verdict\"")
        .expect("the verdict banner is in the DOM");
    let word = lora_doctor::report::summary::verdict_word(report.verdict);
    assert!(dom[verdict_at..].contains(&format!("<h1>{word}</h1>")));
    let matrix_at = dom
        .find("<table id=\"precision-matrix\">")
        .expect("the precision matrix is in the DOM");
    let matrix = &dom[matrix_at..matrix_at + dom[matrix_at..].find("</table>").expect("closed")];
    for p in report.precisions.as_ref().expect("merged") {
        assert!(
            matrix.contains(&format!("<th>{}</th>", p.name)),
            "no matrix row for {}",
            p.name
        );
    }
}

#[test]
fn merged_checkpoint_chart_draws_in_headless_chromium() {
    // SmolLM2-sized forensics by hand (210 modules, 4 broken) on the clean report's page.
    let mut report = clean_report().clone();
    report.forensics = Some(forensics_210());
    let page = html::render(&report, &HtmlOptions::default());
    let dom = assert_charts_drawn(&page, &["chart-forensics"], "report-forensics-210.png");
    let table_at = dom
        .find("<table id=\"forensics-causes\">")
        .expect("the table of causes is in the DOM");
    let table = &dom[table_at..table_at + dom[table_at..].find("</table>").expect("closed")];
    assert_eq!(
        table.matches("<tr><td>").count(),
        4,
        "one row per module with a cause"
    );

    // The real `check --merged` report: every chart, the fit chart included.
    let report = merged_with_forensics();
    let page = html::render(report, &HtmlOptions::default());
    // (Its precision matrix has too few rows for the size check; the SVG charts have none.)
    assert_charts_drawn(
        &page,
        &[
            "chart-heatmap",
            "chart-kl",
            "chart-drift",
            "chart-forensics",
        ],
        "report-merged.png",
    );
}
