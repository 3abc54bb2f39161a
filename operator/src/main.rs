fn main() {
    eprintln!("nanogate-operator: not implemented yet");
    std::process::exit(2);
}
