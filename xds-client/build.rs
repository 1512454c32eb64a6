//! Prepares the Envoy `FileDescriptorSet` that the `envoy-types` crate ships
//! (`src/generated/types.bin`) for the descriptor pool, so the bootstrap
//! parser can use Envoy's JSON/YAML mapping without a system `protoc`:
//!
//! - `envoy_descriptors.bin`: the set without `source_code_info` (the
//!   comments of every `.proto`, ~80% of the bytes, which nothing reads and
//!   which a decoded pool would otherwise keep twice);
//! - `descriptor_index.rs`: for each file its name, its byte range in that
//!   set and its dependencies, and every message and enum full name (nested
//!   ones included) with the file that defines it, so `descriptors.rs` can
//!   decode only the files a lookup needs.
//!
//! The set is read at the wire level: a `FileDescriptorSet` is a run of
//! field-1 records, one per file, so a subset of files is a valid set too.
use std::{env, fmt::Write as _, fs, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bin = envoy_types_descriptors();
    println!("cargo:rerun-if-changed=build.rs");
    let set = fs::read(&bin).unwrap_or_else(|e| panic!("read {}: {e}", bin.display()));

    let mut stripped = Vec::with_capacity(set.len() / 4);
    let mut files = Vec::new();
    for (field, record) in Fields::new(&set) {
        let Record::Bytes(file) = record else {
            panic!("FileDescriptorSet field {field} is not a message")
        };
        assert_eq!(field, 1, "a FileDescriptorSet holds only files (field 1)");
        let file = strip_source_info(file);
        let start = stripped.len();
        put_record(&mut stripped, 1, &file);
        files.push(FileInfo::parse(&file, start, stripped.len()));
    }
    fs::write(out.join("envoy_descriptors.bin"), &stripped).expect("write descriptor set");
    fs::write(out.join("descriptor_index.rs"), render_index(&files)).expect("write index");
}

/// `src/generated/types.bin` of the `envoy-types` dependency.
fn envoy_types_descriptors() -> PathBuf {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(&manifest_dir)
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata json");
    let pkg = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types is a dependency");
    let manifest = PathBuf::from(pkg["manifest_path"].as_str().expect("manifest_path"));
    manifest
        .parent()
        .expect("crate dir")
        .join("src/generated/types.bin")
}

/// A `FileDescriptorProto` without field 9 (`source_code_info`); every
/// other field is copied byte for byte.
fn strip_source_info(file: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(file.len());
    let mut pos = 0;
    let mut fields = Fields::new(file);
    while let Some((field, _)) = fields.next() {
        if field != 9 {
            out.extend_from_slice(&file[pos..fields.pos]);
        }
        pos = fields.pos;
    }
    out
}

/// What the index records of one file.
struct FileInfo {
    name: String,
    start: usize,
    end: usize,
    deps: Vec<String>,
    /// Full names of its messages and enums, nested ones included.
    types: Vec<String>,
}

impl FileInfo {
    fn parse(file: &[u8], start: usize, end: usize) -> Self {
        let mut info = FileInfo {
            name: String::new(),
            start,
            end,
            deps: Vec::new(),
            types: Vec::new(),
        };
        let mut package = String::new();
        for (field, record) in Fields::new(file) {
            match (field, record) {
                (1, Record::Bytes(b)) => info.name = utf8(b),
                (2, Record::Bytes(b)) => package = utf8(b),
                (3, Record::Bytes(b)) => info.deps.push(utf8(b)),
                _ => {}
            }
        }
        for (field, record) in Fields::new(file) {
            match (field, record) {
                // message_type, enum_type
                (4, Record::Bytes(b)) => message_names(b, &package, &mut info.types),
                (5, Record::Bytes(b)) => info.types.push(qualify(&package, &name_of(b))),
                _ => {}
            }
        }
        info
    }
}

/// A `DescriptorProto`'s full name and those of its nested messages
/// (field 3) and enums (field 4).
fn message_names(msg: &[u8], scope: &str, out: &mut Vec<String>) {
    let full = qualify(scope, &name_of(msg));
    for (field, record) in Fields::new(msg) {
        match (field, record) {
            (3, Record::Bytes(b)) => message_names(b, &full, out),
            (4, Record::Bytes(b)) => out.push(qualify(&full, &name_of(b))),
            _ => {}
        }
    }
    out.push(full);
}

/// Field 1 (`name`) of a descriptor message.
fn name_of(msg: &[u8]) -> String {
    Fields::new(msg)
        .find_map(|(field, record)| match (field, record) {
            (1, Record::Bytes(b)) => Some(utf8(b)),
            _ => None,
        })
        .expect("descriptors have a name")
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

fn utf8(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("descriptor strings are UTF-8")
}

fn render_index(files: &[FileInfo]) -> String {
    let position = |name: &str| {
        files
            .iter()
            .position(|f| f.name == name)
            .unwrap_or_else(|| panic!("dependency {name} is not in the descriptor set"))
    };
    let mut out =
        String::from("// Generated by xds-client/build.rs from envoy-types' descriptor set.\n");
    out.push_str("static FILES: &[IndexedFile] = &[\n");
    for f in files {
        let deps: Vec<String> = f.deps.iter().map(|d| position(d).to_string()).collect();
        let _ = writeln!(
            out,
            "    IndexedFile {{ name: {:?}, start: {}, end: {}, deps: &[{}] }},",
            f.name,
            f.start,
            f.end,
            deps.join(", ")
        );
    }
    out.push_str("];\n");
    let mut types: Vec<(&str, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.types.iter().map(move |t| (t.as_str(), i)))
        .collect();
    types.sort_unstable();
    for pair in types.windows(2) {
        assert_ne!(pair[0].0, pair[1].0, "type defined twice");
    }
    out.push_str("static TYPES: &[(&str, u16)] = &[\n");
    for (name, file) in types {
        let _ = writeln!(out, "    ({name:?}, {file}),");
    }
    out.push_str("];\n");
    out
}

// === protobuf wire format ===

enum Record<'a> {
    Bytes(&'a [u8]),
    Scalar,
}

/// The top-level fields of an encoded message: (number, record).
struct Fields<'a> {
    buf: &'a [u8],
    /// Where the next field starts.
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn varint(&mut self) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.buf[self.pos];
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return value;
            }
        }
        panic!("varint longer than 10 bytes")
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Record<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let key = self.varint();
        let record = match key & 7 {
            0 => {
                self.varint();
                Record::Scalar
            }
            1 => {
                self.pos += 8;
                Record::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()).expect("length fits usize");
                let bytes = &self.buf[self.pos..self.pos + len];
                self.pos += len;
                Record::Bytes(bytes)
            }
            5 => {
                self.pos += 4;
                Record::Scalar
            }
            w => panic!("unexpected wire type {w} in a descriptor"),
        };
        Some((key >> 3, record))
    }
}

/// Appends field `field` as a length-delimited record.
fn put_record(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
