//! `head.safetensors` (a bundle's head, or a global's head file) and a
//! bundle's `validation.safetensors` rows.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((head, extra)) = dai_head::Head::from_bytes(data) {
        // A head that loads saves and loads again to the same parameters.
        let bytes = head.to_bytes(&extra).expect("a loaded head saves");
        let (again, _) = dai_head::Head::from_bytes(&bytes).expect("a saved head loads");
        assert_eq!(again.spec, head.spec);
    }
    if let Ok(rows) = dai_head::rows::Rows::from_bytes(data) {
        let _ = rows.to_bytes();
    }
});
