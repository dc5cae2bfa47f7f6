//! Turns pages of a delimited S3 listing into directory entries, one page at a time.
//!
//! Two rules shape it. Keys that cannot be paths are skipped and counted. And when a file `x`
//! and a directory `x/` both exist, the directory wins. S3 returns keys in byte order, and
//! anything sorting between `x` and `x/` starts with `x` followed by a byte below `/`, so a file
//! is held back only until the listing passes `x/`; the held set is a short chain of prefixes,
//! which keeps memory bounded however large the directory is.

use std::collections::VecDeque;

use super::keys::{dir_key_lt, is_valid_name};
use crate::store::{ListPage, ObjectInfo};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    File(ObjectInfo),
    Dir,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedEntry {
    pub name: String,
    pub what: Listed,
}

#[derive(Debug, Default)]
pub struct ListingMerger {
    held: Vec<ListedEntry>,
    /// Keys skipped because they cannot be paths.
    pub skipped: u64,
    /// Files hidden by a directory of the same name.
    pub shadowed: u64,
}

impl ListingMerger {
    /// Adds one page of the listing of `dir_prefix`; ready entries are appended to `out`.
    pub fn push_page(&mut self, dir_prefix: &str, page: ListPage, out: &mut VecDeque<ListedEntry>) {
        // (key relative to the directory, entry): the order S3 lists in.
        let mut items: Vec<(String, ListedEntry)> =
            Vec::with_capacity(page.objects.len() + page.prefixes.len());
        for obj in page.objects {
            let Some(name) = obj.key.strip_prefix(dir_prefix) else {
                self.skipped += 1;
                continue;
            };
            if name.is_empty() {
                continue; // the directory's own marker object
            }
            if !is_valid_name(name) {
                self.skipped += 1;
                continue;
            }
            let name = name.to_string();
            items.push((
                name.clone(),
                ListedEntry {
                    name,
                    what: Listed::File(obj),
                },
            ));
        }
        for prefix in page.prefixes {
            let name = prefix
                .strip_prefix(dir_prefix)
                .and_then(|rest| rest.strip_suffix('/'));
            match name {
                Some(name) if is_valid_name(name) => {
                    let entry = ListedEntry {
                        name: name.to_string(),
                        what: Listed::Dir,
                    };
                    items.push((format!("{name}/"), entry));
                }
                _ => self.skipped += 1,
            }
        }
        items.sort_by(|a, b| a.0.cmp(&b.0));
        for (sort_key, entry) in items {
            self.release_before(&sort_key, out);
            match entry.what {
                Listed::Dir => {
                    if let Some(pos) = self.held.iter().position(|h| h.name == entry.name) {
                        self.held.remove(pos);
                        self.shadowed += 1;
                    }
                    out.push_back(entry);
                }
                Listed::File(_) => self.held.push(entry),
            }
        }
    }

    /// The listing is complete: everything still held is emitted.
    pub fn finish(&mut self, out: &mut VecDeque<ListedEntry>) {
        out.extend(self.held.drain(..));
    }

    /// Emits held files that no later key can shadow any more.
    fn release_before(&mut self, sort_key: &str, out: &mut VecDeque<ListedEntry>) {
        let mut i = 0;
        while i < self.held.len() {
            if dir_key_lt(&self.held[i].name, sort_key) {
                out.push_back(self.held.remove(i));
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn obj(key: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size: 1,
            etag: None,
            last_modified: SystemTime::UNIX_EPOCH,
            meta: None,
        }
    }

    fn page(objects: &[&str], prefixes: &[&str]) -> ListPage {
        ListPage {
            objects: objects.iter().map(|k| obj(k)).collect(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            next_token: None,
            skipped: 0,
        }
    }

    fn names(out: &VecDeque<ListedEntry>) -> Vec<String> {
        let mut v: Vec<String> = out
            .iter()
            .map(|e| match e.what {
                Listed::Dir => format!("{}/", e.name),
                Listed::File(_) => e.name.clone(),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn directory_shadows_file_across_pages() {
        let mut m = ListingMerger::default();
        let mut out = VecDeque::new();
        // "x" on page 1, "x-1" between, "x/" on page 2.
        m.push_page("d/", page(&["d/a", "d/x", "d/x-1"], &[]), &mut out);
        assert_eq!(names(&out), ["a"]);
        m.push_page("d/", page(&["d/y"], &["d/x/"]), &mut out);
        m.finish(&mut out);
        assert_eq!(names(&out), ["a", "x-1", "x/", "y"]);
        assert_eq!(m.shadowed, 1);
    }

    #[test]
    fn odd_keys_are_skipped_and_counted() {
        let mut m = ListingMerger::default();
        let mut out = VecDeque::new();
        let long = format!("o/{}", "n".repeat(300));
        m.push_page(
            "o/",
            page(
                &["o/", "o/ok.txt", &long],
                &["o//", "o/./", "o/../", "o/sub/"],
            ),
            &mut out,
        );
        m.finish(&mut out);
        assert_eq!(names(&out), ["ok.txt", "sub/"]);
        assert_eq!(m.skipped, 4, "long name, empty, dot and dot-dot components");
    }

    #[test]
    fn held_files_stay_bounded_for_a_huge_directory() {
        let mut m = ListingMerger::default();
        let mut out = VecDeque::new();
        for p in 0..100 {
            let keys: Vec<String> = (0..1000)
                .map(|i| format!("big/f{:07}", p * 1000 + i))
                .collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            m.push_page("big/", page(&refs, &[]), &mut out);
            assert!(m.held.len() <= 1, "held {}", m.held.len());
            out.clear();
        }
    }
}
