fn main() {
    // The UI is embedded at compile time: rebuild when it changes.
    println!("cargo:rerun-if-changed=ui");
    println!("cargo:rerun-if-changed=tauri.conf.json");
    badge_fonts();
    tauri_build::build();
}

/// The fonts the join-code badges embed, from Debian (`cargo xtask test` installs them); a
/// build elsewhere points the variables at other files with the same coverage.
fn badge_fonts() {
    let fonts = [
        (
            "LABRACK_BADGE_FONT",
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "fonts-dejavu-core",
        ),
        (
            "LABRACK_BADGE_CJK_FONT",
            "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
            "fonts-droid-fallback",
        ),
    ];
    for (variable, debian_path, package) in fonts {
        println!("cargo:rerun-if-env-changed={variable}");
        let path = std::env::var(variable).unwrap_or_else(|_| debian_path.to_owned());
        assert!(
            std::path::Path::new(&path).is_file(),
            "the badge font {path} is missing: `apt-get install {package}` (the test command \
             installs it), or set {variable} to a font with the same coverage"
        );
        println!("cargo:rerun-if-changed={path}");
        println!("cargo:rustc-env={variable}={path}");
    }
}
