fn main() {
    eprintln!("nano-agent: not implemented yet");
    std::process::exit(2);
}
