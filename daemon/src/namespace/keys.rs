//! Which object keys can be paths, and how paths become keys.
//!
//! A key is a path when every `/`-separated component is a valid file name: non-empty, not
//! `.` or `..`, no NUL, at most [`NAME_MAX`] bytes. Keys that fail are skipped and counted by
//! the listing code; they are never followed, so no key can name something outside the mount.

/// Longest file name Linux accepts (bytes).
pub const NAME_MAX: usize = 255;

/// Whether `name` can be one path component.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= NAME_MAX
        && !name.bytes().any(|b| b == b'/' || b == 0)
}

/// Normalizes a mount prefix (`a/b`, `a/b/`, `/a/b`) to `a/b/`, or `""` for the bucket root.
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for part in trimmed.split('/') {
        if !is_valid_name(part) {
            return Err(format!(
                "prefix {prefix:?} has a component {part:?} that cannot be a path"
            ));
        }
    }
    Ok(format!("{trimmed}/"))
}

/// Joins a relative key (`""` for the mount root) and a child name.
pub fn join(parent_key: &str, name: &str) -> String {
    if parent_key.is_empty() {
        name.to_string()
    } else {
        format!("{parent_key}/{name}")
    }
}

/// `name + "/" < key`, compared byte-wise without allocating.
pub fn dir_key_lt(name: &str, key: &str) -> bool {
    name.bytes().chain(std::iter::once(b'/')).lt(key.bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_names_that_are_not_paths() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(!is_valid_name(&"x".repeat(256)));
        for good in ["a", "...", ".hidden", "a b", "é", &"x".repeat(255)] {
            assert!(is_valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn normalizes_prefixes() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("a/b").unwrap(), "a/b/");
        assert_eq!(normalize_prefix("/a/b/").unwrap(), "a/b/");
        assert!(normalize_prefix("a//b").is_err());
        assert!(normalize_prefix("a/../b").is_err());
    }

    proptest! {
        /// Joining valid names and splitting the key again gives the same names back, and the
        /// key never contains a component that could escape the mount.
        #[test]
        fn join_round_trips(names in proptest::collection::vec("[^/\u{0}]{1,40}", 1..6)) {
            prop_assume!(names.iter().all(|n| is_valid_name(n)));
            let key = names.iter().fold(String::new(), |k, n| join(&k, n));
            let back: Vec<&str> = key.split('/').collect();
            prop_assert_eq!(back, names.iter().map(String::as_str).collect::<Vec<_>>());
        }

        #[test]
        fn dir_key_lt_matches_string_compare(a in "[ -~]{0,8}", b in "[ -~]{0,9}") {
            prop_assert_eq!(dir_key_lt(&a, &b), format!("{a}/") < b);
        }
    }
}
