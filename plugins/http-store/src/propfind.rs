//! PROPFIND `207 Multi-Status` responses → entries (href, collection or file, size, etag,
//! modification time).

use roxmltree::{Document, Node};

const DAV: &str = "DAV:";

/// One `<D:response>` of a multistatus body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The `href` as sent: an absolute path or a full URL, percent-encoded.
    pub href: String,
    pub collection: bool,
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub modified_ms: Option<u64>,
}

/// Parses a multistatus document; properties come from the `200` propstat only.
pub fn parse_multistatus(xml: &str) -> Result<Vec<Entry>, String> {
    let doc = Document::parse(xml).map_err(|e| format!("PROPFIND response is not XML: {e}"))?;
    let mut entries = Vec::new();
    for response in doc.descendants().filter(|n| is(n, "response")) {
        let Some(href) = child(response, "href").and_then(|n| n.text()) else {
            continue;
        };
        let mut entry = Entry {
            href: href.trim().to_string(),
            collection: false,
            size: None,
            etag: None,
            modified_ms: None,
        };
        for propstat in response.children().filter(|n| is(n, "propstat")) {
            let ok = child(propstat, "status")
                .and_then(|n| n.text())
                .is_some_and(|s| s.split_whitespace().nth(1) == Some("200"));
            let Some(prop) = child(propstat, "prop").filter(|_| ok) else {
                continue;
            };
            if let Some(rt) = child(prop, "resourcetype") {
                entry.collection = child(rt, "collection").is_some();
            }
            let text = |name| child(prop, name).and_then(|n| n.text()).map(str::trim);
            entry.size = text("getcontentlength").and_then(|s| s.parse().ok());
            entry.etag = text("getetag").map(str::to_string);
            entry.modified_ms = text("getlastmodified").and_then(parse_http_date);
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn is(node: &Node, name: &str) -> bool {
    node.is_element() && node.tag_name().name() == name && node.tag_name().namespace() == Some(DAV)
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| is(n, name))
}

/// RFC 1123 dates (`Sun, 06 Nov 1994 08:49:37 GMT`) → milliseconds since the Unix epoch.
pub fn parse_http_date(text: &str) -> Option<u64> {
    let mut parts = text.split_whitespace().skip(1);
    let day: u64 = parts.next()?.parse().ok()?;
    let month_name = parts.next()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month_name)? as u64
        + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next() != Some("GMT") || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + (h * 3600 + m * 60 + s) as i64;
    u64::try_from(secs).ok().map(|s| s * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"<?xml version="1.0" encoding="utf-8" ?>
<d:multistatus xmlns:d="DAV:">
  <d:response>
    <d:href>/dav/ck/</d:href>
    <d:propstat><d:prop><d:resourcetype><d:collection/></d:resourcetype></d:prop>
      <d:status>HTTP/1.1 200 OK</d:status></d:propstat>
  </d:response>
  <d:response>
    <d:href>http://127.0.0.1:8080/dav/ck/a%20b.bin</d:href>
    <d:propstat><d:prop><d:resourcetype/><d:getcontentlength>12</d:getcontentlength>
      <d:getetag>"abc"</d:getetag>
      <d:getlastmodified>Sun, 06 Nov 1994 08:49:37 GMT</d:getlastmodified></d:prop>
      <d:status>HTTP/1.1 200 OK</d:status></d:propstat>
    <d:propstat><d:prop><d:getcontentlength>99</d:getcontentlength></d:prop>
      <d:status>HTTP/1.1 404 Not Found</d:status></d:propstat>
  </d:response>
</d:multistatus>"#;

    #[test]
    fn parses_collections_and_files() {
        let entries = parse_multistatus(BODY).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].collection);
        assert_eq!(entries[0].href, "/dav/ck/");
        let file = &entries[1];
        assert!(!file.collection);
        assert_eq!(file.size, Some(12), "the 404 propstat must not override");
        assert_eq!(file.etag.as_deref(), Some("\"abc\""));
        assert_eq!(file.modified_ms, Some(784_111_777_000));
    }

    #[test]
    fn rejects_garbage_and_bad_dates() {
        assert!(parse_multistatus("<not xml").is_err());
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:01 GMT"), Some(1000));
    }
}
