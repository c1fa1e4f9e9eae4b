//! PAX extended-header records, for tests that write tar layers byte by byte (the
//! malicious or unusual ones `tar::Builder` refuses to write).

/// Appends one `LEN KEY=VALUE\n` PAX record to `out`; LEN counts the whole record, its own
/// digits included.
pub fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} ").as_bytes());
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The ustar header of a PAX extended header (type `x`) whose data is `records`, as
/// [`pax_record`] writes them; it applies to the entry that follows it.
pub fn pax_header(records: &[u8]) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("PaxHeaders/entry").unwrap();
    h.set_size(records.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    h
}
