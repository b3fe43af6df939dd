//! A small line chart as SVG (no dependencies): server memory against idle connections.

/// One line of the chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Parses `NAME=X:Y,X:Y,...`.
pub fn parse_series(s: &str) -> Result<Series, String> {
    let (name, pts) = s
        .split_once('=')
        .ok_or_else(|| format!("bad series {s:?} (NAME=X:Y,X:Y)"))?;
    let mut points = Vec::new();
    for p in pts.split(',').filter(|p| !p.is_empty()) {
        let (x, y) = p
            .split_once(':')
            .ok_or_else(|| format!("bad point {p:?} (X:Y)"))?;
        let x = x.trim().parse().map_err(|_| format!("bad x {x:?}"))?;
        let y = y.trim().parse().map_err(|_| format!("bad y {y:?}"))?;
        points.push((x, y));
    }
    Ok(Series {
        name: name.to_string(),
        points,
    })
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the series as an SVG line chart with axes, ticks, point labels and a legend.
pub fn svg(title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> String {
    let (w, h) = (640.0, 400.0);
    let (l, r, t, b) = (80.0, 160.0, 50.0, 60.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let all = series.iter().flat_map(|s| s.points.iter());
    let xmax = nice_max(all.clone().map(|p| p.0).fold(0.0, f64::max));
    let ymax = nice_max(all.map(|p| p.1).fold(0.0, f64::max));
    let px = |x: f64| l + x / xmax * pw;
    let py = |y: f64| t + ph - y / ymax * ph;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    let mut o = String::new();
    o += &format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    o += &format!("<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n");
    o += &format!(
        "<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        l + pw / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (x, y) = (px(f * xmax), py(f * ymax));
        o += &format!(
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n",
            l + pw
        );
        o += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            l - 6.0,
            y + 4.0,
            fmt_num(f * ymax)
        );
        o += &format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            t + ph + 18.0,
            fmt_num(f * xmax)
        );
    }
    o += &format!(
        "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\" stroke=\"black\"/>\n<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
        t + ph,
        t + ph,
        l + pw,
        t + ph
    );
    o += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
        l + pw / 2.0,
        h - 15.0,
        esc(xlabel)
    );
    o += &format!(
        "<text transform=\"translate(20 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        t + ph / 2.0,
        esc(ylabel)
    );
    for (i, s) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        o += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for &(x, y) in &s.points {
            o += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\" text-anchor=\"middle\">{}</text>\n",
                px(x),
                py(y),
                px(x),
                py(y) - 8.0,
                fmt_num(y)
            );
        }
        let ly = t + 10.0 + i as f64 * 20.0;
        o += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            l + pw + 15.0,
            l + pw + 35.0,
            l + pw + 40.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    o += "</svg>\n";
    o
}

fn fmt_num(v: f64) -> String {
    if v == v.round() {
        format!("{}", v as i64)
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
