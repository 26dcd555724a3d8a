//! A flamegraph as SVG from folded stacks (pure). Written here rather than
//! taken from pprof-rs's `flamegraph` feature: that one is inferno, whose
//! CDDL-1.0 licence our permissive-only policy (`deny.toml`) refuses.
//!
//! The layout is the usual one: the root ("all") at the bottom, callees
//! stacked above their caller, each frame as wide as its share of the
//! samples; frames narrower than [`MIN_WIDTH`] pixels are dropped with
//! their callees (they would not show), which also bounds the output.
//! Each frame carries a `<title>` with its name, samples and share, which
//! browsers show on hover.

use std::collections::BTreeMap;
use std::fmt::Write;

pub const WIDTH: f64 = 1200.0;
const ROW: f64 = 16.0;
const TOP: f64 = 36.0;
/// Narrowest frame drawn, in pixels.
pub const MIN_WIDTH: f64 = 0.2;
/// Rough width of a character of the 11 px label font.
const CHAR: f64 = 6.6;

#[derive(Default)]
struct Node {
    samples: u64,
    children: BTreeMap<String, Node>,
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A warm colour that depends only on the name (stable across captures).
fn colour(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let r = 205 + (h % 50);
    let g = 80 + ((h >> 8) % 130);
    let b = (h >> 16) % 55;
    format!("rgb({r},{g},{b})")
}

/// `stacks`: (frames from the outermost caller to the sampled function,
/// samples). The SVG is `WIDTH` wide and as tall as the deepest stack.
pub fn svg(stacks: &[(Vec<String>, u64)], title: &str) -> String {
    let mut root = Node::default();
    for (frames, n) in stacks {
        root.samples += n;
        let mut at = &mut root;
        for f in frames {
            at = at.children.entry(f.clone()).or_default();
            at.samples += n;
        }
    }
    let mut rects = Vec::new();
    let mut depth = 0;
    if root.samples > 0 {
        let scale = WIDTH / root.samples as f64;
        layout(
            "all",
            &root,
            0.0,
            0,
            scale,
            root.samples,
            &mut rects,
            &mut depth,
        );
    }
    let height = TOP + (depth + 1) as f64 * ROW + 8.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<?xml version="1.0" standalone="no"?><svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" xmlns="http://www.w3.org/2000/svg" font-family="monospace" font-size="11"><rect width="100%" height="100%" fill="rgb(250,250,238)"/><text x="{x}" y="22" text-anchor="middle" font-size="15">{t}</text>"#,
        x = WIDTH / 2.0,
        t = escape(title)
    );
    for r in &rects {
        let y = height - 8.0 - (r.depth + 1) as f64 * ROW;
        let _ = write!(
            s,
            r#"<g><title>{name} ({samples} samples, {share:.2}%)</title><rect x="{x:.2}" y="{y}" width="{w:.2}" height="{h}" fill="{c}" rx="2"/>"#,
            name = escape(&r.name),
            samples = r.samples,
            share = r.share * 100.0,
            x = r.x,
            w = r.w,
            h = ROW - 1.0,
            c = colour(&r.name),
        );
        let fits = ((r.w - 6.0) / CHAR).floor();
        if fits >= 3.0 {
            let fits = fits as usize;
            let label: String = if r.name.chars().count() > fits {
                r.name
                    .chars()
                    .take(fits.saturating_sub(2))
                    .chain("..".chars())
                    .collect()
            } else {
                r.name.clone()
            };
            let _ = write!(
                s,
                r#"<text x="{:.2}" y="{}">{}</text>"#,
                r.x + 3.0,
                y + ROW - 4.5,
                escape(&label)
            );
        }
        s.push_str("</g>");
    }
    s.push_str("</svg>\n");
    s
}

struct Rect {
    name: String,
    samples: u64,
    share: f64,
    x: f64,
    w: f64,
    depth: usize,
}

#[allow(clippy::too_many_arguments)]
fn layout(
    name: &str,
    node: &Node,
    x: f64,
    depth: usize,
    scale: f64,
    total: u64,
    out: &mut Vec<Rect>,
    max_depth: &mut usize,
) {
    let w = node.samples as f64 * scale;
    if w < MIN_WIDTH {
        return;
    }
    *max_depth = (*max_depth).max(depth);
    out.push(Rect {
        name: name.to_string(),
        samples: node.samples,
        share: node.samples as f64 / total as f64,
        x,
        w,
        depth,
    });
    let mut cx = x;
    for (child, n) in &node.children {
        layout(child, n, cx, depth + 1, scale, total, out, max_depth);
        cx += n.samples as f64 * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(frames: &[&str], n: u64) -> (Vec<String>, u64) {
        (frames.iter().map(|f| f.to_string()).collect(), n)
    }

    #[test]
    fn frames_are_as_wide_as_their_samples_and_names_are_escaped() {
        let s = svg(
            &[
                stack(&["main", "serve", "infer<f32>"], 3),
                stack(&["main", "serve", "decode"], 1),
                stack(&["main", "idle"], 4),
            ],
            "cpu & <stuff>",
        );
        assert!(s.starts_with("<?xml") && s.ends_with("</svg>\n"));
        assert!(s.contains("cpu &amp; &lt;stuff&gt;"));
        assert!(
            s.contains("<title>infer&lt;f32&gt; (3 samples, 37.50%)</title>"),
            "{s}"
        );
        assert!(s.contains("<title>all (8 samples, 100.00%)</title>"));
        // serve holds half the samples: half the width.
        let serve = s.split("<title>serve ").nth(1).expect("serve");
        assert!(
            serve.contains(&format!(r#"width="{:.2}""#, WIDTH / 2.0)),
            "{serve:.200}"
        );
        assert_eq!(
            s.matches("<rect x=").count(),
            6,
            "all, main, serve, infer, decode, idle"
        );
    }

    #[test]
    fn slivers_are_dropped_and_nothing_sampled_is_an_empty_graph() {
        let mut stacks = vec![stack(&["main", "busy"], 100_000)];
        stacks.push(stack(&["main", "rare"], 1));
        let s = svg(&stacks, "t");
        assert!(!s.contains("rare"), "a 0.012 px frame is not drawn");
        let empty = svg(&[], "t");
        assert_eq!(empty.matches("<rect x=").count(), 0);
    }
}
